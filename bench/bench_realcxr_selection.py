"""Baseline selectors on real chest X-rays (../shared/data/realcxr), per encoder, with paired episodes.

Tasks stay within one source so that source artefacts cannot solve them (see the pack's README):
NIH conditions vs NIH "No Finding", and Kermany bacterial / viral pneumonia vs Kermany normal.
For each encoder the pack is embedded once (cached in --cache), the store is split by source group in
memory, and `xsel.evaluate` runs every selector on the same episodes. Prints a Markdown table:
mean query AUROC of random and each selector's paired difference to random with its 95% CI.

    python bench/bench_realcxr_selection.py [--encoders pixels,resnet18,efficientnet-lite0] [--episodes 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchlib import REALCXR, has_realcxr, overall_row, print_markdown

from xsel.embed import embed
from xsel.evaluate import evaluate
from xsel.store import read_store

GROUPS = {
    "NIH": (
        ("nih-talo", "nih-zech"),
        [
            "Atelectasis",
            "Cardiomegaly",
            "Consolidation",
            "Edema",
            "Effusion",
            "Infiltration",
            "Mass",
            "Nodule",
            "Pneumonia",
        ],
    ),
    "Kermany": (("kermany",), ["Bacterial Pneumonia", "Viral Pneumonia"]),
}
WEIGHTS = {"resnet18": "none"}  # the CNN baseline: random init (no ImageNet download here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="pixels,resnet18,efficientnet-lite0")
    parser.add_argument("--selectors", default="random,kmedoids,kcenter,typiclust,probcover,oracle-balanced")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "stores")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not has_realcxr():
        raise SystemExit(f"realcxr pack not found at {REALCXR}")
    args.cache.mkdir(parents=True, exist_ok=True)
    selectors = args.selectors.split(",")
    report = []
    for encoder in args.encoders.split(","):
        path = args.cache / f"realcxr-{encoder}.h5"
        if not path.exists():
            began = time.perf_counter()
            embed(REALCXR / "labels.csv", path, encoder=encoder, weights=WEIGHTS.get(encoder), show_progress=False)
            print(f"embedded realcxr with {encoder} in {time.perf_counter() - began:.0f} s", flush=True)
        store = read_store(path)
        for group, (sources, conditions) in GROUPS.items():
            began = time.perf_counter()
            result = evaluate(
                store.subset(store.meta["Source"].isin(sources).to_numpy()),
                conditions,
                selectors=selectors,
                k=[args.k],
                episodes=args.episodes,
                pool_size=args.pool_size,
                query_size=args.query_size,
                show_progress=False,
            )
            row = overall_row(result, encoder=encoder, group=group, seconds=time.perf_counter() - began)
            report.append(row)
            print(f"{encoder} / {group}: {len(conditions)} conditions in {row['seconds']:.0f} s", flush=True)

    names = [s for s in selectors if s != "random"]
    print(
        f"\nK={args.k}, pool {args.pool_size}, query {args.query_size}, {args.episodes} episodes per condition, "
        "cosine classifier; random: mean AUROC [95% CI]; others: paired Δ vs random [95% CI]\n"
    )
    print_markdown(report, names, ("encoder", "tasks"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
