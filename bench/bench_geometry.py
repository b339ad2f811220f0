"""Cosine or Euclidean: each geometry-aware selector in both geometries on real chest X-rays (issue 16).

A peer library on raw (Euclidean) embeddings beat xsel's cosine heuristics on NIH episodes; this measures the
choice. One store (EfficientNet-Lite0 embeddings of ../shared/data/realcxr by default, embedded into --cache if absent);
every heuristic runs as NAME:cosine and NAME:euclidean on the same episodes as random, per task group within
sources (so source artefacts cannot solve a task): NIH conditions vs NIH "No Finding", Kermany bacterial / viral
pneumonia vs Kermany normal, COVID-19 vs "No Finding" within the COVID sources. Prints Markdown tables: random's
mean query AUROC, each geometry's paired Δ vs random, and the paired difference Euclidean − cosine, each with its
95% CI (bootstrap over episodes within each condition, as `xsel evaluate` summarises), then Euclidean − cosine
per condition.

    python bench/bench_geometry.py [--cache DIR] [--episodes 100] [--json geometry.json]
                                   [--encoder efficientnet-lite0] [--heuristics kmedoids,kcenter,typiclust,probcover]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import REALCXR, has_realcxr

from xsel.embed import embed
from xsel.evaluate import OVERALL, REFERENCE, evaluate, summarize
from xsel.geometry import GEOMETRIES
from xsel.store import read_store

HEURISTICS = ("kmedoids", "kcenter", "typiclust", "probcover")
GROUPS = {
    "NIH": (
        ("nih-talo", "nih-zech"),
        ["Atelectasis", "Edema", "Cardiomegaly", "Effusion", "Infiltration", "Pneumonia", "Mass", "Nodule"],
    ),
    "Kermany": (("kermany",), ["Bacterial Pneumonia", "Viral Pneumonia"]),
    "COVID": (("ieee8023", "actualmed", "figure1"), ["COVID-19"]),
}


def statistics(row: pd.Series) -> dict:
    """One summary row's paired Δ (to its reference) with the 95% CI and win rate."""
    return {
        "diff": row["diff_vs_random"],
        "ci": [row["diff_low"], row["diff_high"]],
        "win_rate": row["win_rate"],
    }


def euclidean_minus_cosine(episodes: pd.DataFrame, heuristic: str) -> pd.DataFrame:
    """Paired Euclidean − cosine per condition and overall: ``summarize`` pairs every selector with the reference,
    so the cosine variant stands in for random (same episodes, same within-condition bootstrap)."""
    cosine, euclidean = (f"{heuristic}:{g}" for g in GEOMETRIES)
    pair = episodes[episodes["selector"].isin([cosine, euclidean])].copy()
    pair["selector"] = pair["selector"].replace({cosine: REFERENCE})
    summary = summarize(pair)
    return summary[summary["selector"] == euclidean].set_index("condition")


def group_rows(group: str, result, heuristics: list[str]) -> list[dict]:
    """Per heuristic: random's AUROC, each geometry's Δ vs random, Euclidean − cosine overall and per condition."""
    overall = result.summary[result.summary["condition"] == OVERALL].set_index("selector")
    random = overall.loc[REFERENCE]
    rows = []
    for heuristic in heuristics:
        paired = euclidean_minus_cosine(result.episodes, heuristic)
        rows.append(
            {
                "group": group,
                "heuristic": heuristic,
                "random": {"auroc": random["auroc"], "ci": [random["auroc_low"], random["auroc_high"]]},
                **{g: statistics(overall.loc[f"{heuristic}:{g}"]) for g in GEOMETRIES},
                "euclidean_minus_cosine": statistics(paired.loc[OVERALL]),
                "per_condition": {c: statistics(r) for c, r in paired.iterrows() if c != OVERALL},
            }
        )
    return rows


def cell(stats: dict) -> str:
    """Δ [low, high], bold where the CI excludes 0."""
    low, high = stats["ci"]
    mark = "**" if low > 0 or high < 0 else ""
    return f"{mark}{stats['diff']:+.3f}{mark} [{low:+.3f}, {high:+.3f}]"


def print_tables(report: list[dict], heuristics: list[str]) -> None:
    print("| tasks | heuristic | random AUROC | cosine Δ vs random | Euclidean Δ vs random | Euclidean − cosine |")
    print("|---|---|---|---|---|---|")
    for row in report:
        random = row["random"]
        print(
            f"| {row['group']} | {row['heuristic']} | {random['auroc']:.3f} [{random['ci'][0]:.3f}, "
            f"{random['ci'][1]:.3f}] | {cell(row['cosine'])} | {cell(row['euclidean'])} | "
            f"{cell(row['euclidean_minus_cosine'])} |"
        )
    print("\nEuclidean − cosine per condition [95% CI]:\n")
    print("| tasks | condition | " + " | ".join(heuristics) + " |")
    print("|---|---|" + "---|" * len(heuristics))
    for group in dict.fromkeys(row["group"] for row in report):
        rows = {row["heuristic"]: row for row in report if row["group"] == group}
        for condition in rows[heuristics[0]]["per_condition"]:
            cells = [cell(rows[h]["per_condition"][condition]) for h in heuristics]
            print(f"| {group} | {condition} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--heuristics", default=",".join(HEURISTICS))
    parser.add_argument("--episodes", type=int, default=100, help="paired episodes per condition")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "stores")
    parser.add_argument("--json", type=Path, help="write the report (settings, warnings, every figure) here")
    args = parser.parse_args()
    path = args.cache / f"realcxr-{args.encoder}.h5"
    if not path.exists():
        if not has_realcxr():
            raise SystemExit(f"no store at {path} and no realcxr pack at {REALCXR} to embed")
        args.cache.mkdir(parents=True, exist_ok=True)
        embed(REALCXR / "labels.csv", path, encoder=args.encoder, show_progress=False)
    store = read_store(path)
    heuristics = args.heuristics.split(",")
    selectors = ["random", *(f"{h}:{g}" for h in heuristics for g in GEOMETRIES)]
    report, warnings = [], []
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
            seed=args.seed,
            show_progress=False,
        )
        report += group_rows(group, result, heuristics)
        warnings += result.warnings
        print(f"{group}: {len(conditions)} conditions in {time.perf_counter() - began:.0f} s", flush=True)
        for warning in result.warnings:
            print("  note:", warning, flush=True)
    print(
        f"\n{path.name}: K={args.k}, pool {args.pool_size}, query {args.query_size}, {args.episodes} paired episodes "
        "per condition, cosine classifier; random: mean AUROC [95% CI]; others: paired Δ [95% CI], bold where the "
        "CI excludes 0\n"
    )
    print_tables(report, heuristics)
    if args.json:
        settings = {**{k: v for k, v in vars(args).items() if k != "json"}, "store": str(path)}
        payload = {"settings": settings, "warnings": warnings, "rows": report}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
