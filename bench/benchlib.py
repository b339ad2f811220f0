"""Shared pieces of the benchmark scripts (run them as `python bench/NAME.py`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pandas as pd

REALCXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "realcxr"


def has_realcxr() -> bool:
    return (REALCXR / "labels.csv").is_file()


def image_csv(n_images: int, folder: Path) -> Path:
    """A CSV of ``n_images`` images with absolute paths: realcxr when present, else synthetic demo images."""
    if has_realcxr():
        frame = pd.read_csv(REALCXR / "labels.csv").head(n_images)
        frame["Path"] = [str(REALCXR / p) for p in frame["Path"]]
        csv = folder / "images.csv"
        frame.to_csv(csv, index=False)
        return csv
    from xsel.demo import generate_demo_data

    return generate_demo_data(folder / "demo", n_images=n_images, image_size=256)


def timing_selector(name: str, embeddings: np.ndarray):
    """A selector as the speed benchmarks run it: ``uncertainty``/``boostmis`` read a linear probe fitted on
    seeded random labels of the first 1,000 rows; ``None`` for ``medselect`` (it needs a trained checkpoint)."""
    from xsel.selectors import create_selector
    from xsel.train.head import Classifier, fit_linear_head

    if name == "medselect":
        return None
    if name in ("uncertainty", "boostmis"):
        sample = embeddings[:1000]
        labels = np.random.default_rng(0).integers(0, 2, (len(sample), 1)).astype(np.float32)
        head = fit_linear_head(sample, labels, epochs=50)
        model = Classifier(
            path=Path("(random-label probe)"), labels=["label"], head=head, encoder_identity={}, thresholds=[0.5]
        )
        return create_selector(name, model=model)
    return create_selector(name)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def overall_row(result, **fields) -> dict:
    """One report row per evaluation: each selector's overall AUROC, CI, paired Δ vs random and its CI."""
    overall = result.summary[result.summary["condition"] == "all"].set_index("selector")
    row = dict(fields)
    for selector in overall.index:
        r = overall.loc[selector]
        row[selector] = {
            "auroc": r["auroc"],
            "ci": [r["auroc_low"], r["auroc_high"]],
            "diff": r["diff_vs_random"],
            "diff_ci": [r["diff_low"], r["diff_high"]],
            "win_rate": r["win_rate"],
        }
    return row


def print_markdown(report: list[dict], names: list[str], label_columns: tuple[str, str]) -> None:
    """random's AUROC [CI] then each selector's paired Δ [CI]; bold where the Δ's CI is above 0."""
    first, second = label_columns
    print(f"| {first} | {second} | random | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for row in report:
        cells = [f"{row['random']['auroc']:.3f} [{row['random']['ci'][0]:.3f}, {row['random']['ci'][1]:.3f}]"]
        for name in names:
            d = row[name]
            mark = "**" if d["diff_ci"][0] > 0 else ""
            cells.append(f"{mark}{d['diff']:+.3f}{mark} [{d['diff_ci'][0]:+.3f}, {d['diff_ci'][1]:+.3f}]")
        print(f"| {row['encoder']} | {row['group']} | " + " | ".join(cells) + " |")
