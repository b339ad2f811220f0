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


def _plot_overall_curves(
    data: pd.DataFrame,
    x: str,
    group: str,
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
) -> Path:
    """Overall AUROC (condition "all") against ``x``, one line and 95% CI band per ``group``."""
    data = data[data["condition"] == "all"].sort_values(x)
    figure, axes = plt.subplots(figsize=(6, 4.2))
    for name, rows in data.groupby(group, sort=False):
        axes.plot(rows[x], rows["auroc"], marker="o", label=name)
        axes.fill_between(rows[x], rows["auroc_low"], rows["auroc_high"], alpha=0.15)
    if log_x:
        axes.set_xscale("log", base=2)
    ticks = sorted(data[x].unique())
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save_figure(figure, Path(path))


def plot_label_efficiency(summary: pd.DataFrame, path: str | Path) -> Path:
    """Overall AUROC against K per selector, with its 95% CI band: how fast labels pay off."""
    return _plot_overall_curves(
        summary,
        "k",
        "selector",
        path,
        xlabel="K (labelled images)",
        ylabel="query AUROC, mean over conditions",
        title="Label efficiency",
        log_x=True,
    )


def plot_rounds(summary: pd.DataFrame, path: str | Path) -> Path:
    """Active learning: overall AUROC against labelled images, one line and 95% CI band per strategy."""
    return _plot_overall_curves(
        summary,
        "labelled",
        "strategy",
        path,
        xlabel="labelled images (cold start, then one round of K each)",
        ylabel="query AUROC of the linear probe, mean over conditions",
        title="Active learning",
    )
