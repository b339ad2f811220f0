"""Does self-supervised pretraining on the pack's own images help few-shot classification?

Pretrains resnet18 with `xsel train encoder` on every image of ../shared/data/realcxr (no labels used),
then embeds the pack three ways at the same image size — the pretrained encoder, the same architecture
with random weights (`--weights none`), and `pixels` — and runs the same random-K episodes on each
(K=20 labels, cosine classifier; NIH conditions vs NIH "No Finding", Kermany pneumonias vs Kermany
normal, as in bench_realcxr_selection.py). Episodes are paired across encoders (same pools, queries and
picks), so the table gives each encoder's AUROC and its paired difference to the random-weights network.

    python bench/bench_realcxr_pretraining.py [--method moco] [--image-size 96] [--minutes 18] [--episodes 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_realcxr_selection import GROUPS
from benchlib import REALCXR, has_realcxr

from xsel.embed import embed
from xsel.evaluate import REFERENCE, evaluate, summarize
from xsel.store import read_store
from xsel.train.encoder import EncoderTrainingConfig, train_encoder

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="moco")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=18.0, help="pretraining budget (CPU minutes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--precision", default="bf16", help="bf16 autocast: ~1.4x faster training on this CPU")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--run", type=Path, help="reuse this finished run folder instead of pretraining")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not has_realcxr():
        raise SystemExit(f"realcxr pack not found at {REALCXR}")
    csv = REALCXR / "labels.csv"
    size = args.image_size
    run = args.run
    if run is None:
        run = RESULTS / f"pretrain-{args.method}-{size}px"
        config = EncoderTrainingConfig(
            method=args.method,
            arch="resnet18",
            image_size=size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            precision=args.precision,
            max_minutes=args.minutes,
        )
        began = time.perf_counter()
        result = train_encoder(csv, run, config, resume=True, show_progress=False)
        print(
            f"pretrained {args.method} {size} px: {result.epochs:.1f} epochs, {result.steps} steps, "
            f"{result.images_per_second:.0f} img/s, loss {result.final_loss:.3f}, "
            f"{(time.perf_counter() - began) / 60:.1f} min, stopped by {result.stopped_by}",
            flush=True,
        )

    stores = RESULTS / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    label = f"resnet18 {args.method}"
    encoders = {  # the random-weights network is the reference of the paired differences
        REFERENCE: (f"realcxr-resnet18-none-{size}px.h5", {"encoder": "resnet18", "weights": "none"}),
        label: (f"realcxr-{run.name}.h5", {"encoder": "resnet18", "weights": str(run / "encoder.pt")}),
        "pixels": (f"realcxr-pixels-{size}px.h5", {"encoder": "pixels"}),
    }
    tables = []
    for name, (filename, options) in encoders.items():
        path = stores / filename
        if not path.exists() or name == label:
            began = time.perf_counter()
            embed(csv, path, image_size=size, overwrite=True, show_progress=False, **options)
            print(f"embedded the pack with {name} in {time.perf_counter() - began:.0f} s", flush=True)
        store = read_store(path)
        for group, (sources, conditions) in GROUPS.items():
            result = evaluate(
                store.subset(store.meta["Source"].isin(sources).to_numpy()),
                conditions,
                selectors=["random"],
                k=[args.k],
                episodes=args.episodes,
                pool_size=args.pool_size,
                query_size=args.query_size,
                show_progress=False,
            )
            tables.append(result.episodes.assign(selector=name, group=group))
    episodes = pd.concat(tables, ignore_index=True)
    report = []
    for group in GROUPS:
        summary = summarize(episodes[episodes["group"] == group].drop(columns="group"))
        overall = summary[summary["condition"] == "all"].set_index("selector")
        for name in encoders:
            r = overall.loc[name]
            report.append(
                {
                    "group": group,
                    "encoder": "resnet18 random weights" if name == REFERENCE else name,
                    "auroc": r["auroc"],
                    "ci": [r["auroc_low"], r["auroc_high"]],
                    "diff": r["diff_vs_random"],
                    "diff_ci": [r["diff_low"], r["diff_high"]],
                }
            )
    print(
        f"\nK={args.k}, pool {args.pool_size}, query {args.query_size}, {args.episodes} episodes per condition, "
        f"cosine classifier, {size} px; AUROC [95% CI] and paired Δ vs resnet18 random weights [95% CI]\n"
    )
    print("| tasks | encoder | AUROC | Δ vs random weights |")
    print("|---|---|---|---|")
    for row in report:
        mark = "**" if row["diff_ci"][0] > 0 else ""
        diff = (
            "—"
            if row["encoder"].endswith("random weights")
            else (f"{mark}{row['diff']:+.3f}{mark} [{row['diff_ci'][0]:+.3f}, {row['diff_ci'][1]:+.3f}]")
        )
        auroc = f"{row['auroc']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]"
        print(f"| {row['group']} | {row['encoder']} | {auroc} | {diff} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
