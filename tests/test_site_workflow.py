"""The hospital's workflow end to end through the CLI: a DICOM folder → scan → embed (the folder itself) → a
constrained selection → certificate → verify → Label Studio and CVAT files, each row traced to its DICOM instance."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from tests.dicom_folder import write_site_folder


def _workflow(folder, tmp_path, cli, *, balance: bool, embed_folder: bool):
    """``embed_folder``: embed the folder itself (every image in it), else the chest-only list the scan wrote."""
    scanned = cli("scan", folder, "--out", tmp_path / "images.csv", *([] if embed_folder else ["--chest-only"]))
    assert scanned.exit_code == 0, scanned.output
    images = pd.read_csv(tmp_path / "images.csv", dtype=str)
    source = [folder] if embed_folder else [tmp_path / "images.csv", "--image-root", folder]
    embedded = cli("embed", *source, "--out", tmp_path / "pool.h5", "--encoder", "pixels", "--workers", "0", "-q")
    assert embedded.exit_code == 0, embedded.output
    options = ["--dedup", "0.999", "--allow-same-patient", *(["--balance", "View"] if balance else [])]
    k = min(4, len(images))
    out = tmp_path / "to_label.csv"
    picked = cli("select", tmp_path / "pool.h5", "--k", k, "--out", out, "--selector", "kcenter", *options)
    assert picked.exit_code == 0, picked.output
    verified = cli("select", "--verify", tmp_path / "to_label.SELECTION.json")
    assert verified.exit_code == 0, verified.output
    for form in ("label-studio", "cvat"):
        exported = cli("export-labels", out, "--format", form, "--out", tmp_path / form, "--csv", folder)
        assert exported.exit_code == 0, exported.output
    return pd.read_csv(out, dtype=str), images


def test_dicom_folder_to_labelling_queue(tmp_path, cli):
    folder = tmp_path / "pacs"
    write_site_folder(folder)
    selection, images = _workflow(folder, tmp_path, cli, balance=True, embed_folder=False)
    assert selection["Path"].isin(images["Path"]).all() and selection["reason"].notna().all()
    sidecar = pd.read_csv(tmp_path / "label-studio" / "images.csv", dtype=str)
    traced = sidecar.merge(images, on="Path", suffixes=("", "_scan"))
    assert len(traced) == len(selection) and (traced["SOPInstanceUID"] == traced["SOPInstanceUID_scan"]).all()
    tasks = json.loads((tmp_path / "label-studio" / "tasks.json").read_text())
    assert [task["data"]["rank"] for task in tasks] == list(range(1, len(selection) + 1))
    manifest = (tmp_path / "cvat" / "images" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(manifest[0]) == {"version": "1.1"} and len(manifest) == 2 + len(selection)


@pytest.mark.realdata
def test_real_dicom_originals_to_labelling_queue(realcxr, tmp_path, cli):
    folder = tmp_path / "originals"
    shutil.copytree(realcxr / "originals", folder)
    selection, images = _workflow(folder, tmp_path, cli, balance=False, embed_folder=True)
    assert {"dicom_cxr_fake_monochrome1.dcm", "dicom_cxr_monochrome2.dcm"} <= set(images["Path"])
    embedded = pd.read_csv(tmp_path / "label-studio" / "images.csv", dtype=str)
    assert len(embedded) == len(selection) >= 1
