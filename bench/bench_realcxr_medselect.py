"""The learned selector on real chest X-rays: train on seen NIH conditions, test on unseen ones.

Patients are split once (seeded): 60% for training the selector (its own validation split inside),
40% held out for testing, so no test image was ever in a training pool. Training episodes come from
NIH images only (NIH conditions vs NIH "No Finding"); testing covers unseen NIH conditions and the
Kermany tasks (bacterial / viral pneumonia vs normal children's X-rays), never seen in training.
Every selector, the learned one included, runs on the same test episodes. Prints a Markdown table.

    python bench/bench_realcxr_medselect.py [--encoders efficientnet-lite0,pixels] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
from benchlib import REALCXR, overall_row, print_markdown

from xsel.embed import embed
from xsel.evaluate import evaluate
from xsel.store import read_store
from xsel.train.medselect import SelectorConfig
from xsel.train.selector import train_selector

NIH = ("nih-talo", "nih-zech")
SEEN = ["Effusion", "Infiltration", "Pneumonia", "Consolidation", "Pleural_Thickening"]
VALIDATION = ["Mass", "Nodule"]
UNSEEN_NIH = ["Atelectasis", "Edema", "Cardiomegaly"]
UNSEEN_KERMANY = ["Bacterial Pneumonia", "Viral Pneumonia"]


def test_patients(store) -> np.ndarray:
    """The held-out 40% of patients (seeded by patient ID): no test image is ever in a training pool."""
    patients = store.meta["PatientID"].astype(str)
    return np.asarray([zlib.crc32(f"test:{p}".encode()) % 100 < 40 for p in patients])


def training_config(args, **changes) -> SelectorConfig:
    """The learned selectors' training settings on NIH: seen conditions, validation on Mass and Nodule."""
    settings = dict(
        conditions=SEEN,
        val_conditions=VALIDATION,
        k=args.k,
        pool_size=args.pool_size,
        query_size=args.query_size,
        batch_size=16,
        val_every=25,
        val_episodes=30,
        val_fraction=0.3,
        max_minutes=args.minutes,
    )
    return SelectorConfig(**(settings | changes))


def shuffled_order_overlap(store, checkpoint, mask, args, pools: int = 50) -> float:
    """How much the LSTM's picks depend on pool order: mean share of K picks kept when a pool is shuffled."""
    from xsel.episodes import EpisodeTask
    from xsel.train.medselect import MedSelectSelector

    selector = MedSelectSelector(checkpoint)
    test = store.subset(mask)
    task = EpisodeTask(test, UNSEEN_NIH[0], pool_size=args.pool_size, query_size=args.query_size, k=args.k)
    rng = np.random.default_rng(0)
    shared = []
    for index in range(pools):
        pool = test.embeddings[task.episode(index, 0).pool]
        order = rng.permutation(len(pool))
        in_order = set(selector.select(pool, args.k, seed=0).tolist())
        shuffled = set(order[selector.select(pool[order], args.k, seed=0)].tolist())
        shared.append(len(in_order & shuffled) / args.k)
    return float(np.mean(shared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="efficientnet-lite0,pixels")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--episodes", type=int, default=100, help="test episodes per condition")
    parser.add_argument("--train-episodes", type=int, default=60_000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "stores")
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "results" / "medselect")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    selectors = ["random", "kmedoids", "kcenter", "typiclust", "probcover", "oracle-balanced"]
    report = []
    for encoder in args.encoders.split(","):
        path = args.cache / f"realcxr-{encoder}.h5"
        if not path.exists():
            embed(REALCXR / "labels.csv", path, encoder=encoder, show_progress=False)
        store = read_store(path)
        test_patient = test_patients(store)
        source = store.meta["Source"]
        train_store = store.subset(source.isin(NIH).to_numpy() & ~test_patient)
        run_dir = args.runs / encoder
        config = training_config(args, episodes=args.train_episodes)
        began = time.perf_counter()
        trained = train_selector(
            train_store, run_dir, config, resume=(run_dir / "last.pt").exists(), show_progress=False
        )
        print(
            f"{encoder}: trained {trained.steps} steps in {(time.perf_counter() - began) / 60:.1f} min, best val "
            f"{trained.best_val_auroc:.3f} at step {trained.best_step} (random {trained.random_val_auroc:.3f})",
            flush=True,
        )
        specs = [*selectors, f"medselect={run_dir / 'selector.pt'}"]
        order_overlap = shuffled_order_overlap(
            store, run_dir / "selector.pt", source.isin(NIH).to_numpy() & test_patient, args
        )
        print(f"{encoder}: picks shared between a pool in store order and the same pool shuffled: {order_overlap:.0%}")
        for group, sources, conditions in (("NIH unseen", NIH, UNSEEN_NIH), ("Kermany", ("kermany",), UNSEEN_KERMANY)):
            test_store = store.subset(source.isin(sources).to_numpy() & test_patient)
            result = evaluate(
                test_store,
                conditions,
                selectors=specs,
                k=[args.k],
                episodes=args.episodes,
                pool_size=args.pool_size,
                query_size=args.query_size,
                show_progress=False,
            )
            row = overall_row(
                result,
                encoder=encoder,
                group=group,
                train_minutes=trained.seconds / 60,
                train_steps=trained.steps,
                shuffled_order_overlap=order_overlap,
            )
            report.append(row)
            for warning in result.warnings:
                print("  note:", warning)
    names = ["kmedoids", "kcenter", "typiclust", "probcover", "oracle-balanced", "medselect"]
    print(
        f"\nTest patients only; K={args.k}, pool {args.pool_size}, query {args.query_size}, {args.episodes} episodes "
        "per condition, cosine classifier. random: mean AUROC [95% CI]; others: paired Δ vs random [95% CI]\n"
    )
    print_markdown(report, names, ("encoder", "unseen tasks"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
