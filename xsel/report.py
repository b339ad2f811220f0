"""Self-contained HTML reports a reviewer can open anywhere: why these K images, and which selector wins.

One file, no network and no JavaScript: CSS is inline, thumbnails are base64 PNG data URIs, charts are
inline SVG (so sites without matplotlib can make reports). :func:`write_selection_report` shows the picks in
rank order with score and reason, a 2-D PCA map of the pool (cosine geometry: embeddings L2-normalised)
with the picks highlighted, and coverage tables of picks vs pool (View, Sex, age band, k-means cluster).
:func:`write_evaluation_report` shows an evaluation summary as tables and a bar chart of mean AUROC with
95% CIs.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xsel.constraints import AGE_BAND, AGE_BANDS, UNKNOWN, stratum_values
from xsel.errors import InputError
from xsel.geometry import cluster_labels, unit_rows
from xsel.io.atomic import write_atomic
from xsel.io.images import ImageDecodeError, read_image
from xsel.io.table import PATH_COLUMN, read_csv_checked
from xsel.store import Store, read_store

MAP_POINTS = 5000  # pool points drawn on the map at most (a seeded sample); picks are always drawn
PICK_COLOUR, POOL_COLOUR = "#d62728", "#8c9bab"
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1d2733;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea}
.meta{color:#5a6878;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{width:176px;border:1px solid #dde3ea;border-radius:6px;padding:8px;font-size:12px;background:#fafbfc}
.card img{width:160px;height:160px;object-fit:contain;background:#000;display:block;margin:0 auto 6px}
.missing{width:160px;height:160px;background:#eef1f4;color:#8a96a3;display:flex;align-items:center;
justify-content:center;text-align:center;font-size:11px;margin:0 auto 6px}
.rank{font-weight:700;color:#d62728}.path{word-break:break-all;color:#3b4754}.reason{color:#5a6878;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:6px 16px 12px 0}
th,td{border:1px solid #dde3ea;padding:3px 8px;text-align:right}th{background:#f2f5f8}
td:first-child,th:first-child{text-align:left}.tables{display:flex;flex-wrap:wrap;align-items:flex-start}
.low{background:#fdecea}caption{font-weight:600;text-align:left;padding:2px 0}
"""


def _escape(value) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="generator" content="xsel">'
        f"<title>{_escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_escape(title)}</h1><div class="meta">{_escape(subtitle)} · made {created} by xsel</div>'
        + "".join(sections)
        + "</body></html>\n"
    )


def _write_html(text: str, path: str | Path) -> Path:
    data = text.encode("utf-8")
    return write_atomic(path, lambda temporary: temporary.write_bytes(data))


def _thumbnail(path: Path, size: int) -> str:
    """A base64 PNG data URI of the image shrunk to ``size`` pixels on its longer side."""
    gray = read_image(path)
    image = Image.fromarray(np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(frame: pd.DataFrame, caption: str = "") -> str:
    head = "".join(f"<th>{_escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_escape(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(False))
    title = f"<caption>{_escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def coverage_table(pool_values: pd.Series, pick_values: pd.Series, order: Sequence[str] = ()) -> pd.DataFrame:
    """Count and share of each value among the pool and the picks (blank → "unknown"): values named in
    ``order`` first in that order, then the rest by pool count."""
    pool = pool_values.fillna("unknown").astype(str).replace("", "unknown")
    picks = pick_values.fillna("unknown").astype(str).replace("", "unknown")
    pool_counts, pick_counts = pool.value_counts(), picks.value_counts()
    present = list(pool_counts.index) + [v for v in pick_counts.index if v not in pool_counts.index]
    values = [v for v in order if v in present] + [v for v in present if v not in order]
    rows = []
    for value in values:
        in_pool, in_picks = int(pool_counts.get(value, 0)), int(pick_counts.get(value, 0))
        rows.append(
            {
                "value": value,
                "pool": in_pool,
                "pool %": f"{100 * in_pool / max(len(pool), 1):.1f}",
                "picks": in_picks,
                "picks %": f"{100 * in_picks / max(len(picks), 1):.1f}",
            }
        )
    return pd.DataFrame(rows)


def _scatter_svg(xy: np.ndarray, picked: np.ndarray, ranks: list[int], labels: tuple[str, str]) -> str:
    """Pool points grey, picks red with their rank, in a 640×460 SVG."""
    width, height, margin = 640, 460, 44
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    scaled = (xy - low) / span
    px = margin + scaled[:, 0] * (width - 2 * margin)
    py = height - margin - scaled[:, 1] * (height - 2 * margin)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="PCA map of the pool">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="#9aa5b1"/>',
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="#9aa5b1"/>',
        f'<text x="{width / 2}" y="{height - 12}" font-size="12" text-anchor="middle">{_escape(labels[0])}</text>',
        f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {height / 2})">{_escape(labels[1])}</text>',
    ]
    parts += [
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{POOL_COLOUR}" fill-opacity="0.55"/>'
        for x, y, chosen in zip(px, py, picked, strict=True)
        if not chosen
    ]
    for (x, y), rank in zip(np.column_stack([px, py])[picked], ranks, strict=True):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{PICK_COLOUR}" stroke="#fff" stroke-width="1"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="10" fill="#7a1010">{rank}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _reasons(selection: pd.DataFrame, reasons) -> list[str]:
    if reasons is None:
        if "reason" not in selection.columns:
            return [""] * len(selection)
        return selection["reason"].fillna("").astype(str).tolist()
    if isinstance(reasons, Mapping):
        return [str(reasons.get(path, "")) for path in selection[PATH_COLUMN]]
    reasons = list(reasons)
    if len(reasons) != len(selection):
        raise InputError(f"reasons: {len(reasons)} given for {len(selection)} picks; give one per pick or a Path map")
    return [str(r) for r in reasons]


def write_selection_report(
    path: str | Path,
    selection: pd.DataFrame | str | Path,
    store: Store | str | Path,
    *,
    pool_rows: Sequence[int] | np.ndarray | None = None,
    reasons: Mapping[str, str] | Sequence[str] | None = None,
    image_root: str | Path | None = None,
    clusters: int = 10,
    thumbnail_size: int = 160,
    title: str | None = None,
    seed: int = 0,
) -> Path:
    """Write one HTML file explaining a selection: thumbnails in rank order, a PCA map, coverage tables.

    ``selection`` is the table ``select`` returns (or its CSV): ``rank``, ``Path``, ``score``, ``selector``;
    its paths must be in ``store``. ``pool_rows`` are the store rows the selector chose from (default: all).
    ``reasons`` (one line per pick, in selection order, or a Path → reason map; default: a ``reason`` column
    if present) show under each thumbnail. Thumbnails decode ``image_root / Path`` (images that cannot be
    read show as a grey box with the reason). Clusters are seeded k-means on the unit-normalised pool.
    """
    if isinstance(selection, str | Path):
        selection = read_csv_checked(selection)
    store = store if isinstance(store, Store) else read_store(store)
    if not {"rank", PATH_COLUMN} <= set(selection.columns):
        raise InputError("the selection needs 'rank' and 'Path' columns (as `xsel select` writes)")
    selection = selection.sort_values("rank", kind="stable").reset_index(drop=True)
    row_of = {p: i for i, p in enumerate(store.paths)}
    missing = [p for p in selection[PATH_COLUMN] if p not in row_of]
    if missing:
        raise InputError(f"{store.path}: {len(missing)} picks are not in the store (first: {missing[0]!r})")
    pool = np.arange(len(store)) if pool_rows is None else np.asarray(pool_rows, dtype=np.int64)
    picked_rows = np.array([row_of[p] for p in selection[PATH_COLUMN]], dtype=np.int64)
    pool = np.union1d(pool, picked_rows)
    picked = np.isin(pool, picked_rows)
    rank_of = dict(zip(picked_rows.tolist(), selection["rank"].astype(int).tolist(), strict=True))

    points = unit_rows(store.embeddings[pool])
    cluster = cluster_labels(points, clusters, seed)
    sections = [_picks_section(selection, _reasons(selection, reasons), image_root, thumbnail_size)]
    sections.append(_map_section(points, picked, [rank_of[r] for r in pool[picked]], seed))
    meta = store.meta.iloc[pool].reset_index(drop=True)
    tables = []
    for column in ("View", "Sex"):
        if column in meta.columns:
            tables.append(_table(coverage_table(meta[column], meta[column][picked]), column))
    if "Age" in meta.columns:
        bands = stratum_values(meta, AGE_BAND).replace(UNKNOWN, "unknown")  # the bands --balance/--quota name
        order = [name for _, _, name in AGE_BANDS]
        tables.append(_table(coverage_table(bands, bands[picked], order), "age band"))
    clusters_column = pd.Series([f"cluster {c}" for c in cluster])
    tables.append(
        _table(coverage_table(clusters_column, clusters_column[picked]), f"k-means cluster ({cluster.max() + 1})")
    )
    sections.append('<h2>Coverage: picks vs pool</h2><div class="tables">' + "".join(tables) + "</div>")
    selector = selection["selector"].iloc[0] if "selector" in selection.columns else "a selector"
    subtitle = (
        f"{len(selection)} images picked by {selector} from a pool of {len(pool)} "
        f"({store.attrs.get('encoder', 'unknown encoder')} embeddings, store {store.path.name})"
    )
    return _write_html(_page(title or "Selection report", subtitle, sections), path)


def _picks_section(selection: pd.DataFrame, reasons: list[str], image_root, size: int) -> str:
    root = Path(image_root) if image_root is not None else None
    cards = []
    for (_, pick), reason in zip(selection.iterrows(), reasons, strict=True):
        source = Path(pick[PATH_COLUMN]) if root is None else root / pick[PATH_COLUMN]
        try:
            picture = f'<img alt="rank {int(pick["rank"])}" src="{_thumbnail(source, size)}">'
        except ImageDecodeError as error:
            picture = f'<div class="missing">{_escape(error)}</div>'
        score = pick.get("score")
        score_text = "" if score is None or pd.isna(score) else f" · score {float(score):.4g}"
        cards.append(
            f'<div class="card">{picture}<div><span class="rank">#{int(pick["rank"])}</span>{_escape(score_text)}</div>'
            f'<div class="path">{_escape(pick[PATH_COLUMN])}</div>'
            + (f'<div class="reason">{_escape(reason)}</div>' if reason else "")
            + "</div>"
        )
    return '<h2>Picks in rank order</h2><div class="grid">' + "".join(cards) + "</div>"


def _map_section(points: np.ndarray, picked: np.ndarray, ranks: list[int], seed: int) -> str:
    from sklearn.decomposition import PCA

    components = min(2, points.shape[1], len(points))
    model = PCA(n_components=components, random_state=seed)
    xy = model.fit_transform(points)
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
    ratio = list(model.explained_variance_ratio_) + [0.0] * (2 - components)
    shown = np.ones(len(points), dtype=bool)
    note = ""
    if (~picked).sum() > MAP_POINTS:
        rest = np.flatnonzero(~picked)
        shown = picked.copy()
        shown[np.random.default_rng(seed).choice(rest, MAP_POINTS, replace=False)] = True
        note = f" ({MAP_POINTS} of the {len(rest)} unpicked images drawn, a seeded sample)"
    labels = (f"PC1 ({100 * ratio[0]:.1f}% of variance)", f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    svg = _scatter_svg(xy[shown], picked[shown], ranks, labels)
    return (
        "<h2>Map of the pool</h2>"
        f'<div class="meta">PCA of the unit-normalised embeddings; picks in red with their rank{_escape(note)}</div>'
        + svg
    )


def _bar_chart_svg(rows: pd.DataFrame, title: str) -> str:
    """Mean AUROC per selector with its 95% CI as whiskers; the y axis spans the CIs."""
    width, height, left, bottom, top = max(360, 90 * len(rows) + 80), 300, 56, 70, 30
    low = float(np.floor(min(rows["auroc_low"].min(), 0.5) * 20) / 20)
    high = float(np.ceil(max(rows["auroc_high"].max(), low + 0.05) * 20) / 20)

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * (height - top - bottom)

    step = (width - left - 20) / len(rows)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_escape(title)}">',
        f'<text x="{width / 2}" y="18" font-size="13" text-anchor="middle">{_escape(title)}</text>',
    ]
    for tick in np.arange(low, high + 1e-9, 0.05):
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eef1f4"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="10" text-anchor="end">{tick:.2f}</text>')
    for i, row in enumerate(rows.itertuples(index=False)):
        x = left + i * step + step * 0.2
        bar = step * 0.6
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        parts.append(
            f'<rect x="{x:.1f}" y="{y(row.auroc):.1f}" width="{bar:.1f}" '
            f'height="{y(low) - y(row.auroc):.1f}" fill="{colour}" fill-opacity="0.8"/>'
        )
        centre = x + bar / 2
        parts.append(
            f'<line x1="{centre:.1f}" x2="{centre:.1f}" y1="{y(row.auroc_low):.1f}" y2="{y(row.auroc_high):.1f}" '
            'stroke="#1d2733" stroke-width="1.5"/>'
        )
        for value in (row.auroc_low, row.auroc_high):
            parts.append(
                f'<line x1="{centre - 5:.1f}" x2="{centre + 5:.1f}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                'stroke="#1d2733" stroke-width="1.5"/>'
            )
        parts.append(
            f'<text x="{centre:.1f}" y="{height - bottom + 14}" font-size="11" text-anchor="end" '
            f'transform="rotate(-30 {centre:.1f} {height - bottom + 14})">{_escape(row.selector)}</text>'
        )
    parts.append(
        f'<text x="14" y="{(height - bottom + top) / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {(height - bottom + top) / 2})">mean AUROC (95% CI)</text></svg>'
    )
    return "".join(parts)


OVERALL = "all"  # the summary's condition over all conditions (xsel.evaluate.OVERALL; evaluate pulls in plugins)
SUMMARY_COLUMNS = ("auroc", "auroc_low", "auroc_high", "diff_vs_random", "diff_low", "diff_high", "win_rate")


def write_evaluation_report(
    path: str | Path,
    summary: pd.DataFrame | str | Path,
    *,
    settings: Mapping | None = None,
    warnings: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """Write one HTML file from an evaluation summary (``Evaluation.summary`` or ``summary.csv``).

    Per K: a bar chart of mean AUROC with 95% CI per selector over all conditions, and a table per
    condition of AUROC [CI], the paired difference to random [CI] and the win rate.
    """
    if isinstance(summary, str | Path):
        summary = pd.read_csv(summary)
    needed = {"selector", "condition", "k", *SUMMARY_COLUMNS}
    if not needed <= set(summary.columns):
        raise InputError(f"evaluation summary lacks columns {', '.join(sorted(needed - set(summary.columns)))}")
    sections = []
    if settings:
        shown = {key: value for key, value in settings.items() if not isinstance(value, Mapping | list)}
        sections.append(
            "<h2>Settings</h2>" + _table(pd.DataFrame({"setting": list(shown), "value": list(shown.values())}))
        )
    if warnings:
        sections.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_escape(w)}</li>" for w in warnings) + "</ul>")
    for budget, rows in summary.groupby("k", sort=True):
        overall = rows[rows["condition"] == OVERALL]
        chart_rows = overall if len(overall) else rows.drop_duplicates("selector")
        sections.append(f"<h2>K = {int(budget)}</h2>")
        sections.append(_bar_chart_svg(chart_rows, f"Mean AUROC over all conditions, K={int(budget)}"))
        tables = []
        for condition, group in rows.groupby("condition", sort=False):
            table = pd.DataFrame(
                {
                    "selector": group["selector"],
                    "AUROC [95% CI]": [
                        f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
                        for a, lo, hi in zip(group["auroc"], group["auroc_low"], group["auroc_high"], strict=True)
                    ],
                    "Δ vs random [95% CI]": [
                        f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                        for d, lo, hi in zip(
                            group["diff_vs_random"], group["diff_low"], group["diff_high"], strict=True
                        )
                    ],
                    "win rate": [f"{w:.2f}" for w in group["win_rate"]],
                }
            )
            if "probe_auroc" in group.columns:  # archive evaluations: the multi-label probe beside the classifier
                table["probe AUROC [95% CI]"] = [
                    f"{a:.3f} [{lo:.3f}, {hi:.3f}]"
                    for a, lo, hi in zip(
                        group["probe_auroc"], group["probe_auroc_low"], group["probe_auroc_high"], strict=True
                    )
                ]
                table["probe Δ vs random [95% CI]"] = [
                    f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                    for d, lo, hi in zip(
                        group["probe_diff_vs_random"], group["probe_diff_low"], group["probe_diff_high"], strict=True
                    )
                ]
            tables.append(_table(table, str(condition)))
        sections.append('<div class="tables">' + "".join(tables) + "</div>")
    subtitle = f"{summary['selector'].nunique()} selectors, {summary['condition'].nunique()} conditions (incl. all)"
    return _write_html(_page(title or "Evaluation report", subtitle, sections), path)
