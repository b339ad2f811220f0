"""``xsel export-labels``: a selection of DICOM files → PNGs, a sidecar, Label Studio / CVAT import files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

import xsel.labelling as labelling
from tests.dicom_folder import write_site_folder
from xsel.errors import InputError
from xsel.io.images import read_image
from xsel.labelling import CHEXPERT_FINDINGS, export_labels, label_studio_config
from xsel.scan import scan_folder, write_scan

REPOSITORY = Path(__file__).resolve().parents[1]
PICKS = ["p1/s1/pa.dcm", "p2/ap_mono1.dcm", "p1/s1/lat.dcm", "p3/IM0001", "png/one.png"]


@pytest.fixture
def site(tmp_path):
    """A scanned DICOM folder and a selection of 5 of its images, as `xsel select` writes it."""
    folder = tmp_path / "pacs"
    write_site_folder(folder)
    images_csv = tmp_path / "images.csv"
    write_scan(scan_folder(folder, show_progress=False), images_csv)
    table = pd.read_csv(images_csv, dtype={"Path": str, "PatientID": str}).set_index("Path").loc[PICKS].reset_index()
    selection = pd.concat(
        [
            pd.DataFrame({"rank": range(1, 6), "score": [0.9, 0.8, 0.7, 0.6, 0.5], "selector": "typiclust"}),
            table,
        ],
        axis=1,
    )[["rank", "Path", "score", "selector", *table.columns.drop("Path")]]
    selection_csv = tmp_path / "to_label.csv"
    selection.to_csv(selection_csv, index=False)
    return tmp_path, folder, images_csv, selection_csv


def test_label_studio_export_end_to_end(site, cli):
    tmp_path, folder, _, selection_csv = site
    out = tmp_path / "queue"
    result = cli("export-labels", selection_csv, "--format", "label-studio", "--out", out, "--image-root", folder, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["images", "images.csv", "label_config.xml", "tasks.json"]
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["rank"] for t in tasks] == [1, 2, 3, 4, 5]
    first = tasks[0]["data"]
    assert first["image"] == "/data/local-files/?d=queue/images/0001_pa.png"
    assert first["score"] == 0.9 and isinstance(first["score"], float) and first["selector"] == "typiclust"
    assert (first["PatientID"], first["View"], first["Sex"], first["Age"]) == ("p1", "PA", "M", 65.0)
    assert tasks[4]["data"]["SOPInstanceUID"] is None  # a PNG has no DICOM instance: null, never invented
    config = ElementTree.fromstring((out / "label_config.xml").read_text())
    image = config.find("Image")
    choices = config.find("Choices")
    assert image.get("value") == "$image" and all("image" in t["data"] for t in tasks)
    assert choices.get("toName") == image.get("name") and choices.get("choice") == "multiple"
    assert [c.get("value") for c in choices.findall("Choice")] == list(CHEXPERT_FINDINGS)


def test_pngs_are_windowed_inverted_and_traced_back(site):
    tmp_path, folder, _, selection_csv = site
    out = tmp_path / "queue"
    result = export_labels(selection_csv, out, format="csv", image_root=folder, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["images", "images.csv"]
    sidecar = pd.read_csv(out / "images.csv")
    assert list(sidecar.columns) == list(labelling.SIDECAR_COLUMNS)
    assert sidecar["Path"].tolist() == PICKS and sidecar["rank"].tolist() == [1, 2, 3, 4, 5]
    for row in sidecar.itertuples():
        png = np.asarray(Image.open(out / row.Image))
        assert png.dtype == np.uint8 and png.ndim == 2
        np.testing.assert_array_equal(png, np.round(read_image(folder / row.Path) * 255).astype(np.uint8))
        if row.Path.endswith(".dcm") or "IM" in row.Path:
            header = pydicom.dcmread(folder / row.Path, stop_before_pixels=True)
            assert (row.SOPInstanceUID, row.StudyInstanceUID) == (header.SOPInstanceUID, header.StudyInstanceUID)
            assert row.PatientID == header.PatientID
    normal = np.asarray(Image.open(out / sidecar.loc[0, "Image"]), dtype=float)
    inverted = np.asarray(Image.open(out / sidecar.loc[1, "Image"]), dtype=float)  # MONOCHROME1
    assert normal[:, :5].mean() < normal[:, -5:].mean()  # the raw ramp rises left to right
    assert inverted[:, :5].mean() > inverted[:, -5:].mean()  # MONOCHROME1: high values are dark
    assert result.errors.empty and not result.warnings


def test_cvat_manifest_follows_the_documented_format(site):
    tmp_path, folder, _, selection_csv = site
    out = tmp_path / "cvat"
    export_labels(selection_csv, out, format="cvat", image_root=folder, max_side=32, show_progress=False)
    lines = (out / "images" / "manifest.jsonl").read_text().splitlines()
    assert all(line.strip() and "\n" not in line for line in lines)  # one JSON object per line, no blank lines
    header, kind, *items = [json.loads(line) for line in lines]
    assert header == {"version": "1.1"} and kind == {"type": "images"}
    assert len(items) == 5
    allowed = {"name", "extension", "width", "height", "meta", "checksum"}
    for item, rank in zip(items, range(1, 6), strict=True):
        assert {"name", "extension", "width", "height"} <= set(item) <= allowed
        assert isinstance(item["name"], str) and item["extension"] == ".png"
        assert isinstance(item["width"], int) and isinstance(item["height"], int)
        assert item["name"].startswith(f"{rank:04d}_")  # predefined sorting = rank order
        image = Image.open(out / "images" / (item["name"] + item["extension"]))
        assert image.size == (item["width"], item["height"]) and max(image.size) <= 32
        assert item["checksum"] == hashlib.md5(image.tobytes()).hexdigest()
    labels = json.loads((out / "labels.json").read_text())
    assert [label["name"] for label in labels] == list(CHEXPERT_FINDINGS)
    assert all(label["type"] == "tag" and label["attributes"] == [] for label in labels)


def test_csv_input_resolves_paths_and_fills_dicom_columns(site, tmp_path):
    _, folder, images_csv, selection_csv = site
    bare = pd.read_csv(selection_csv)[["rank", "Path", "score", "selector"]]
    bare.to_csv(selection_csv, index=False)
    for source in (images_csv, folder):  # the scanned CSV, or the folder itself
        out = tmp_path / f"from-{source.name}"
        result = export_labels(
            selection_csv, out, format="csv", images_csv=source, image_root=folder, show_progress=False
        )
        patients = result.images["PatientID"]
        assert patients.iloc[:4].tolist() == ["p1", "p2", "p1", "p3"] and pd.isna(patients.iloc[4])
        assert result.images["SOPInstanceUID"].iloc[:4].notna().all()


def test_url_prefix_and_document_root(site):
    tmp_path, folder, _, selection_csv = site
    out = tmp_path / "deep" / "queue"
    export_labels(selection_csv, out, image_root=folder, url_prefix="https://files.example/q/", show_progress=False)
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "https://files.example/q/images/0001_pa.png"
    export_labels(selection_csv, out, image_root=folder, document_root=tmp_path, overwrite=True, show_progress=False)
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=deep/queue/images/0001_pa.png"
    with pytest.raises(InputError, match="not inside the Label Studio document root"):
        export_labels(selection_csv, out, image_root=folder, document_root=folder, overwrite=True, show_progress=False)


def test_unreadable_picks_are_listed_and_the_rest_exported(site):
    tmp_path, folder, _, selection_csv = site
    (folder / "p3" / "IM0001").unlink()
    result = export_labels(selection_csv, tmp_path / "queue", image_root=folder, show_progress=False)
    assert len(result.images) == 4 and result.errors["Path"].tolist() == ["p3/IM0001"]
    assert "1 of 5 picks could not be read" in result.warnings[0]
    assert pd.read_csv(tmp_path / "queue" / "errors.csv")["Path"].tolist() == ["p3/IM0001"]
    with pytest.raises(InputError, match="none of the 5 picks could be read"):
        export_labels(selection_csv, tmp_path / "other", image_root=tmp_path, show_progress=False)
    assert not (tmp_path / "other").exists()


def test_output_appears_only_when_complete(site, monkeypatch):
    tmp_path, folder, _, selection_csv = site
    out = tmp_path / "queue"
    export_labels(selection_csv, out, image_root=folder, show_progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        export_labels(selection_csv, out, image_root=folder, show_progress=False)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(labelling, "label_studio_config", crash)
    with pytest.raises(RuntimeError):
        export_labels(selection_csv, out, image_root=folder, overwrite=True, show_progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--format", "yolo"], "yolo"),
        (["--max-side", "2"], "at least 8 pixels"),
        (["--findings", "A,A"], "distinct"),
        (["--image-root", "missing"], "folder not found"),
    ],
)
def test_bad_options_are_input_errors(site, cli, arguments, message):
    tmp_path, _, _, selection_csv = site
    result = cli("export-labels", selection_csv, "--out", tmp_path / "queue", *arguments)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_custom_findings_config_escapes_names():
    config = ElementTree.fromstring(label_studio_config(["Effusion", 'Mass "large" & <hard>']))
    assert [c.get("value") for c in config.iter("Choice")] == ["Effusion", 'Mass "large" & <hard>']


@pytest.mark.realdata
def test_real_dicom_originals_export(realcxr, tmp_path):
    selection = pd.DataFrame(
        {"rank": [1, 2], "Path": ["dicom_cxr_monochrome2.dcm", "dicom_cxr_fake_monochrome1.dcm"], "score": [1.0, 0.5]}
    )
    selection_csv = tmp_path / "sel.csv"
    selection.to_csv(selection_csv, index=False)
    result = export_labels(
        selection_csv,
        tmp_path / "q",
        format="cvat",
        images_csv=realcxr / "originals",
        max_side=256,
        show_progress=False,
    )
    assert result.images["SOPInstanceUID"].notna().all() and result.images["PatientID"].notna().all()
    normal, fake = (np.asarray(Image.open(tmp_path / "q" / p), dtype=float) for p in result.images["Image"])
    assert max(normal.shape) == 256
    assert np.corrcoef(normal.ravel(), fake.ravel())[0, 1] < -0.9  # the fake MONOCHROME1 copy shows inverted


def label_studio_binary() -> Path | None:
    """The label-studio executable of ``make labelstudio-check``'s own environment, or one on PATH."""
    local = REPOSITORY / ".venv-ls" / "bin" / "label-studio"
    if local.is_file():
        return local
    found = shutil.which("label-studio")
    return Path(found) if found else None


@pytest.mark.labelstudio
def test_label_studio_imports_the_tasks(tmp_path):
    binary = label_studio_binary()
    if binary is None:
        pytest.skip("label-studio is not installed (run `make labelstudio-check` to install it into .venv-ls)")
    check = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "check_label_studio.py"), "--label-studio", str(binary),
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "Label Studio check passed" in check.stdout


def test_names_written_to_disk_are_safe_on_any_system():
    """Image stems of exported files and the referee's per-hospital folders: separators, spaces and non-ASCII become
    ``_``; nothing left → the fallback name."""
    from xsel.io.outputs import safe_name

    assert safe_name("Source=a/b c", "blank") == "Source_a_b_c"
    assert safe_name("../..", "blank") == "blank" and safe_name("ü", "image") == "image"
    assert safe_name("chest-01.v2", "x") == "chest-01.v2"
