"""After labelling, on real chest X-rays (../shared/data/realcxr): the linear probe and active learning.

Both parts use the NIH images only (`Source` nih-talo / nih-zech) embedded with EfficientNet-Lite0
(cached in --cache; rebuilt with `xsel embed` when missing):

(a) Linear probe over the NIH labels: patients split 70/30 (seeded; no patient on both sides), one
    multi-label head fitted with `fit_linear_head` (weighted BCE, 200 full-batch steps) on the training
    patients, AUROC per label on the test patients with a 95% percentile bootstrap CI over test images.
(b) Active learning (`xsel.train.active_learning.simulate`): each NIH condition vs NIH "No Finding", a shared
    typiclust cold start of K, then --rounds rounds of K more per strategy; query AUROC of the linear probe
    after each round, paired differences vs random with 95% bootstrap CIs.

Writes bench/results/realcxr_active_learning.{json,md} and the rounds report folder; prints the Markdown.

    python bench/bench_realcxr_active_learning.py [--episodes 60] [--rounds 3] [--k 20] [--pool-size 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_realcxr_selection import GROUPS
from benchlib import REALCXR, has_realcxr

from xsel.embed import embed
from xsel.labels import condition_labels
from xsel.store import read_store
from xsel.train.active_learning import simulate, write_rounds_report
from xsel.train.head import fit_linear_head

ENCODER = "efficientnet-lite0"
NIH_SOURCES, NIH_CONDITIONS = GROUPS["NIH"]
NIH_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
    "No Finding",
]
RESULTS = Path(__file__).parent / "results"


def bootstrap_auroc(labels: np.ndarray, scores: np.ndarray, seed: int, samples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap CI of the AUROC over test images (resamples with one class are skipped)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        draw = rng.integers(0, len(labels), len(labels))
        if 0 < labels[draw].sum() < len(draw):
            values.append(roc_auc_score(labels[draw], scores[draw]))
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def linear_probe_table(store, seed: int) -> list[dict]:
    """Per-label test AUROC of one multi-label linear probe, trained and tested on disjoint patients."""
    import torch
    from sklearn.metrics import roc_auc_score

    patients = store.meta["PatientID"].astype(str).to_numpy()
    unique = np.unique(patients)
    test_patients = set(np.random.default_rng(seed).choice(unique, int(0.3 * len(unique)), replace=False))
    test = np.isin(patients, list(test_patients))
    assert not set(patients[test]) & set(patients[~test]), "patient-level split"
    targets = np.stack([condition_labels(store.meta, label) for label in NIH_LABELS], axis=1)
    head = fit_linear_head(store.embeddings[~test], targets[~test], seed=seed)
    with torch.inference_mode():
        logits = head(torch.as_tensor(store.embeddings[test])).double().numpy()
    rows = []
    for column, label in enumerate(NIH_LABELS):
        y = targets[test, column]
        known = ~np.isnan(y)
        y, score = y[known].astype(int), logits[known, column]
        low, high = bootstrap_auroc(y, score, seed)
        rows.append(
            {
                "label": label,
                "train_positives": int(np.nansum(targets[~test, column])),
                "test_positives": int(y.sum()),
                "test_images": int(known.sum()),
                "auroc": float(roc_auc_score(y, score)),
                "ci": [low, high],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=300)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--strategies", default="random,typiclust,uncertainty,boostmis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=RESULTS / "stores")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--store", type=Path, help=f"a store of the pack made by another encoder (default: {ENCODER}, embedded here)"
    )
    args = parser.parse_args()
    if not has_realcxr():
        raise SystemExit(f"realcxr pack not found at {REALCXR}")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.store is not None and not args.store.exists():
        raise SystemExit(f"--store {args.store}: not found")
    path = args.store or args.cache / f"realcxr-{ENCODER}.h5"
    if not path.exists():
        began = time.perf_counter()
        embed(REALCXR / "labels.csv", path, encoder=ENCODER, show_progress=False)
        print(f"embedded realcxr with {ENCODER} in {time.perf_counter() - began:.0f} s", flush=True)
    store = read_store(path)
    nih = store.subset(store.meta["Source"].isin(NIH_SOURCES).to_numpy())

    began = time.perf_counter()
    probe = linear_probe_table(nih, args.seed)
    print(f"linear probe on {len(nih)} NIH images in {time.perf_counter() - began:.1f} s", flush=True)

    began = time.perf_counter()
    result = simulate(
        nih,
        NIH_CONDITIONS,
        rounds=args.rounds,
        selectors=args.strategies.split(","),
        k=args.k,
        episodes=args.episodes,
        pool_size=args.pool_size,
        query_size=args.query_size,
        seed=args.seed,
        show_progress=False,
    )
    seconds = time.perf_counter() - began
    print(f"active learning: {len(NIH_CONDITIONS)} conditions × {args.episodes} episodes, {seconds:.0f} s", flush=True)
    write_rounds_report(result, args.out / "realcxr_active_learning")

    lines = markdown(probe, result, args, len(nih))
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "realcxr_active_learning.md").write_text(text + "\n")
    payload = {
        "settings": {**result.settings, "store": str(path), "images": len(nih), "seconds": seconds},
        "linear_probe": probe,
        "active_learning": result.summary.to_dict("records"),
        "warnings": result.warnings,
    }
    (args.out / "realcxr_active_learning.json").write_text(json.dumps(payload, indent=2, default=float))


def markdown(probe: list[dict], result, args, images: int) -> list[str]:
    """The two tables: per-label probe AUROC, then AUROC per round (random) and paired Δ vs random."""
    mean = np.mean([row["auroc"] for row in probe if row["label"] != "No Finding"])
    encoder = args.store.name if args.store else ENCODER
    lines = [
        f"Linear probe ({encoder}, {images} NIH images, patients split 70/30, weighted BCE): test AUROC [95% CI]; "
        f"mean over the 14 findings {mean:.3f}",
        "",
        "| label | train positives | test positives / images | AUROC [95% CI] |",
        "|---|---|---|---|",
    ]
    for row in probe:
        lines.append(
            f"| {row['label']} | {row['train_positives']} | {row['test_positives']} / {row['test_images']} | "
            f"{row['auroc']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] |"
        )
    settings = result.settings
    overall = result.summary[result.summary["condition"] == "all"]
    lines += [
        "",
        f"Active learning ({len(settings['conditions'])} NIH conditions vs No Finding, {args.episodes} paired episodes "
        f"each, pool {args.pool_size}, query {args.query_size}; typiclust cold start of {args.k}, then "
        f"{args.rounds} rounds of {args.k}; linear probe): random's query AUROC [95% CI], others' paired Δ vs random "
        "[95% CI], bold where the CI is above 0",
        "",
        "| strategy | " + " | ".join(f"{n} labels" for n in settings["labelled"]) + " |",
        "|---|" + "---|" * len(settings["labelled"]),
    ]
    for strategy in settings["strategies"]:
        cells = []
        for labelled in settings["labelled"]:
            row = overall[(overall["strategy"] == strategy) & (overall["labelled"] == labelled)].iloc[0]
            if strategy == "random":
                cells.append(f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]")
            elif row["round"] == 0:
                cells.append("(shared cold start)")
            else:
                mark = "**" if row["diff_low"] > 0 else ""
                cells.append(
                    f"{mark}{row['diff_vs_random']:+.3f}{mark} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]"
                )
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    last = settings["labelled"][-1]
    final = result.summary[result.summary["labelled"] == last]
    lines += [
        "",
        f"At {last} labels, per condition: random's AUROC, then each strategy's paired Δ vs random",
        "",
        "| condition | random | " + " | ".join(s for s in settings["strategies"] if s != "random") + " |",
        "|---|---|" + "---|" * (len(settings["strategies"]) - 1),
    ]
    for condition in settings["conditions"]:
        rows = final[final["condition"] == condition].set_index("strategy")
        cells = [f"{rows.loc['random', 'auroc']:.3f}"]
        for strategy in settings["strategies"]:
            if strategy != "random":
                r = rows.loc[strategy]
                mark = "**" if r["diff_low"] > 0 else ""
                cells.append(f"{mark}{r['diff_vs_random']:+.3f}{mark} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
