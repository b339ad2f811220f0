"""Evaluation plots (matplotlib, from the `train` extra), written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from xsel.io.atomic import write_atomic


def save_figure(figure, path: Path) -> Path:
    """Write a figure as PNG atomically and close it (figures left open leak memory in long runs)."""
    try:
        return write_atomic(
            path, lambda temporary: figure.savefig(temporary, format="png", dpi=130, bbox_inches="tight")
        )
    finally:
        plt.close(figure)


def plot_auroc(summary: pd.DataFrame, path: str | Path) -> Path:
    """Mean query AUROC with 95% CI per condition (and over all), one marker per selector, at the first K."""
    budget = summary["k"].iloc[0]
    data = summary[summary["k"] == budget]
    conditions = list(dict.fromkeys(data["condition"]))
    selectors = list(dict.fromkeys(data["selector"]))
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(conditions) + 2), 4.2))
    width = 0.8 / len(selectors)
    for i, selector in enumerate(selectors):
        rows = data[data["selector"] == selector].set_index("condition").loc[conditions]
        x = np.arange(len(conditions)) + (i - (len(selectors) - 1) / 2) * width
        error = [rows["auroc"] - rows["auroc_low"], rows["auroc_high"] - rows["auroc"]]
        axes.errorbar(x, rows["auroc"], yerr=error, fmt="o", capsize=3, label=selector)
    axes.set_xticks(np.arange(len(conditions)), conditions, rotation=20, ha="right")
    axes.set_ylabel("query AUROC (mean, 95% CI)")
    axes.set_title(f"Few-shot AUROC with K={budget} labels per episode")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, ncols=min(6, len(selectors)), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return save_figure(figure, Path(path))


def plot_label_efficiency(summary: pd.DataFrame, path: str | Path) -> Path:
    """Overall AUROC against K per selector, with its 95% CI band: how fast labels pay off."""
    data = summary[summary["condition"] == "all"].sort_values("k")
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for selector, rows in data.groupby("selector", sort=False):
        axes.plot(rows["k"], rows["auroc"], marker="o", label=selector)
        axes.fill_between(rows["k"], rows["auroc_low"], rows["auroc_high"], alpha=0.15)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(data["k"].unique()), [str(k) for k in sorted(data["k"].unique())])
    axes.set_xlabel("K (labelled images)")
    axes.set_ylabel("query AUROC, mean over conditions")
    axes.set_title("Label efficiency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, Path(path))
