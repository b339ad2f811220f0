"""HTML reports: one self-contained file (no network, no script) with thumbnails, a PCA map and coverage tables."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.dicom_folder import write_site_folder
from xsel.constraints import stratum_values
from xsel.errors import InputError
from xsel.report import coverage_table, write_evaluation_report, write_selection_report
from xsel.scan import scan_folder
from xsel.store import read_store, write_store

VOID = {"meta", "img", "br", "hr", "input", "link", "circle", "line", "rect"}


class _Structure(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self):
        super().__init__()
        self.open, self.tags, self.images, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()


def parse(html: str) -> _Structure:
    structure = _Structure()
    structure.feed(html)
    structure.close()
    assert not structure.errors and not structure.open, (structure.errors, structure.open)
    return structure


def assert_self_contained(html: str) -> None:
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    for match in re.finditer(r'(?:src|href)="([^"]*)"', html):
        assert match.group(1).startswith("data:image/png;base64,"), match.group(1)[:60]
    for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S):
        ElementTree.fromstring(svg)  # well-formed inline SVG


@pytest.fixture
def pool(tmp_path):
    """A scanned DICOM folder embedded as random vectors (two clusters), and a selection of 4 images."""
    folder = tmp_path / "pacs"
    write_site_folder(folder)
    table = scan_folder(folder, show_progress=False).table
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    embeddings = centres[np.arange(len(table)) % 2] + 0.1 * rng.normal(size=(len(table), 16))
    store_path = tmp_path / "pool.h5"
    write_store(
        store_path,
        embedding_chunks=[embeddings.astype(np.float32)],
        paths=table["Path"].tolist(),
        meta=table.drop(columns=["Path"]),
        attrs={"encoder": "pixels", "weights_sha256": "0" * 64, "preprocessing": {"image_size": 32}},
    )
    picks = ["p1/s1/pa.dcm", "p2/ap_mono1.dcm", "png/one.png", "p3/IM0001"]
    selection = pd.DataFrame(
        {"rank": [1, 2, 3, 4], "Path": picks, "score": [0.9, 0.5, np.nan, 0.1], "selector": "typiclust"}
    )
    return tmp_path, folder, store_path, selection


def test_selection_report_is_one_self_contained_file(pool):
    tmp_path, folder, store_path, selection = pool
    reasons = ["most typical image of cluster 1 of 4 (3 images)", "farthest from the picks so far", "", "x < y & z"]
    out = write_selection_report(
        tmp_path / "report.html", selection, store_path, reasons=reasons, image_root=folder, clusters=3
    )
    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    structure = parse(html)
    assert len(structure.images) == 4 and [i["alt"] for i in structure.images] == [f"rank {r}" for r in range(1, 5)]
    for image in structure.images:
        thumbnail = Image.open(io.BytesIO(base64.b64decode(image["src"].split(",", 1)[1])))
        assert thumbnail.format == "PNG" and max(thumbnail.size) <= 160
    assert "farthest from the picks so far" in html and "x &lt; y &amp; z" in html
    assert html.index("#1<") < html.index("#2<") < html.index("#3<") < html.index("#4<")
    assert "score 0.9" in html and "PC1 (" in html and html.count('fill="#d62728"') == 4
    assert html.count("<circle") == 10  # every pool image is on the map
    for caption in ("View", "Sex", "age band", "k-means cluster (3)"):
        assert f"<caption>{caption}</caption>" in html
    assert "4 images picked by typiclust from a pool of 10" in html
    assert not list(tmp_path.glob(".report*"))  # the temporary is gone


def test_pool_rows_missing_images_and_a_reason_column(pool):
    tmp_path, folder, store_path, selection = pool
    store = read_store(store_path)
    pool_rows = [store.paths.index(p) for p in selection["Path"]] + [store.paths.index("p4/ct.dcm")]
    selection = selection.assign(reason=["a", "b", "c", "d"])
    (folder / "png" / "one.png").unlink()
    html = write_selection_report(tmp_path / "r.html", selection, store, pool_rows=pool_rows, image_root=folder)
    html = html.read_text(encoding="utf-8")
    parse(html)
    assert "from a pool of 5" in html and 'class="missing">file not found<' in html
    assert all(f'<div class="reason">{r}</div>' in html for r in "abcd")


def test_large_pools_draw_a_sample_of_points(pool, monkeypatch):
    import xsel.report as report

    tmp_path, folder, store_path, selection = pool
    monkeypatch.setattr(report, "MAP_POINTS", 3)
    html = write_selection_report(tmp_path / "r.html", selection, store_path, image_root=folder).read_text()
    assert "3 of the 6 unpicked images drawn" in html
    assert html.count("<circle") == 3 + 4


def test_picks_outside_the_store_are_input_errors(pool):
    tmp_path, _, store_path, selection = pool
    selection.loc[0, "Path"] = "elsewhere.dcm"
    with pytest.raises(InputError, match="1 picks are not in the store"):
        write_selection_report(tmp_path / "r.html", selection, store_path)
    with pytest.raises(InputError, match="needs 'rank' and 'Path'"):
        write_selection_report(tmp_path / "r.html", selection.drop(columns=["rank"]), store_path)


def test_coverage_counts_and_age_bands():
    table = coverage_table(pd.Series(["PA", "PA", "AP", None]), pd.Series(["AP", "L"]))
    assert table["value"].tolist() == ["PA", "AP", "unknown", "L"]
    assert table["pool"].tolist() == [2, 1, 1, 0] and table["picks"].tolist() == [0, 1, 0, 1]
    assert table["picks %"].tolist() == ["0.0", "50.0", "0.0", "50.0"]
    ordered = coverage_table(pd.Series(["80+", "0-17", "80+"]), pd.Series(["0-17"]), ["0-17", "18-39", "80+"])
    assert ordered["value"].tolist() == ["0-17", "80+"]
    ages = pd.DataFrame({"Age": [0.5, 17.9, 18, 65, 80, None, "n/a"]})
    bands = stratum_values(ages, "AgeBand").tolist()  # the same bands --balance AgeBand and --quota name
    assert bands == ["0-17", "0-17", "18-39", "60-79", "80+", "(blank)", "(blank)"]


def evaluation_summary() -> pd.DataFrame:
    from xsel.evaluate import summarize

    rng = np.random.default_rng(0)
    rows = [
        {"episode": e, "condition": c, "selector": s, "k": k, "auroc": base + rng.normal(0, 0.03), "ap": 0.5,
         "f1": 0.5, "kappa": 0.1}
        for k in (10, 20)
        for c in ("Edema", "Atelectasis")
        for e in range(8)
        for s, base in (("random", 0.6), ("typiclust", 0.65), ("kcenter", 0.58))
    ]  # fmt: skip
    return summarize(pd.DataFrame(rows), seed=0)


def test_evaluation_report_tables_and_bar_charts(tmp_path):
    summary = evaluation_summary()
    csv = tmp_path / "summary.csv"
    summary.to_csv(csv, index=False)
    out = write_evaluation_report(
        tmp_path / "evaluate.html", csv, settings={"episodes": 8, "classifier": "cosine"}, warnings=["Edema: scarce"]
    )
    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    parse(html)
    assert html.count("<svg") == 2 and "K = 10" in html and "K = 20" in html
    assert html.count("<caption>Edema</caption>") == 2 and html.count("<caption>all</caption>") == 2
    typiclust = summary[(summary["selector"] == "typiclust") & (summary["condition"] == "all") & (summary["k"] == 10)]
    assert f"{typiclust['auroc'].iloc[0]:.3f} [" in html and "Edema: scarce" in html and "cosine" in html
    with pytest.raises(InputError, match="lacks columns"):
        write_evaluation_report(tmp_path / "bad.html", summary.drop(columns=["auroc_low"]))


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no headless chromium (apt-get install chromium)")
def test_reports_render_in_a_headless_browser_without_console_errors(pool):
    tmp_path, folder, store_path, selection = pool
    pages = [
        write_selection_report(tmp_path / "selection.html", selection, store_path, image_root=folder),
        write_evaluation_report(tmp_path / "evaluate.html", evaluation_summary()),
    ]
    for page in pages:
        screenshot = page.with_suffix(".png")
        run = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
             "--window-size=1280,2000", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Uncaught" not in run.stderr and "ERROR:CONSOLE" not in run.stderr, run.stderr[-2000:]
        pixels = np.asarray(Image.open(screenshot).convert("L"))
        assert pixels.shape == (2000, 1280) and pixels.std() > 10  # something was drawn
