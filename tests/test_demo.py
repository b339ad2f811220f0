"""The built-in demo data and `xsel demo`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xsel.demo import CONDITIONS, NEGATIVE, generate_demo_data, reset_demo_dir
from xsel.store import read_store


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = generate_demo_data(tmp_path / "a", n_images=10, seed=3)
    second = generate_demo_data(tmp_path / "b", n_images=10, seed=3)
    third = generate_demo_data(tmp_path / "c", n_images=10, seed=4)
    assert first.read_bytes() == second.read_bytes()
    paths = pd.read_csv(first)["Path"]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in paths)
    assert pd.read_csv(third)["Path"].tolist() != paths.tolist() or any(
        (tmp_path / "a" / p).read_bytes() != (tmp_path / "c" / p).read_bytes() for p in paths
    )


def test_labels_follow_chexpert_conventions(tmp_path):
    labels = pd.read_csv(generate_demo_data(tmp_path, n_images=200, image_size=64))
    assert {"Path", "PatientID", "Age", "Sex", "View", NEGATIVE, *CONDITIONS} <= set(labels.columns)
    for condition in CONDITIONS:
        assert set(labels[condition].dropna().unique()) <= {-1.0, 0.0, 1.0}
        assert (labels[condition] == 1).sum() >= 10, condition
    positive_any = (labels[list(CONDITIONS)].abs() == 1).any(axis=1)
    assert ((labels[NEGATIVE] == 1) == ~positive_any).all(), "No Finding exactly when no condition"
    assert labels["PatientID"].nunique() < len(labels), "some patients have follow-up images"


def test_cardiomegaly_enlarges_the_heart_shadow(tmp_path):
    labels = pd.read_csv(generate_demo_data(tmp_path, n_images=240, image_size=64))

    # bright pixels just beside the heart's usual edge, lower chest
    def heart_band(path):
        image = np.asarray(Image.open(tmp_path / path), dtype=np.float32) / 255
        return image[38:52, 44:52].mean()

    enlarged = labels.loc[labels["Cardiomegaly"] == 1, "Path"].map(heart_band)
    normal = labels.loc[labels[NEGATIVE] == 1, "Path"].map(heart_band)
    assert enlarged.mean() > normal.mean() + 0.02


def test_demo_command_runs_the_whole_pipeline(tmp_path, cli):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--images", "400", "--episodes", "2", "--train-minutes", "0.05", "-q")
    assert result.exit_code == 0, result.output
    assert "400 synthetic images" in result.stdout and "Learned selector:" in result.stdout
    assert "K=20: query AUROC" in result.stdout and "medselect" in result.stdout
    assert "the same images as the workstation's selection" in result.stdout
    store = read_store(out / "demo.h5")
    assert len(store) == 400 and store.attrs["encoder"] == "pixels"
    assert (out / "evaluation" / "summary.csv").is_file() and (out / "bundle" / "manifest.json").is_file()
    assert len(pd.read_csv(out / "selection.csv")) == 20
    # the hospital's side: DICOM archive → scan → constrained selection → certificate → labelling tools
    assert "left out: 1 view L is not frontal" in result.stdout and "(verified)" in result.stdout
    site = pd.read_csv(out / "site" / "to_label.csv")
    assert len(site) == 20 and site["StudyInstanceUID"].is_unique and site["SOPInstanceUID"].notna().all()
    assert site["View"].value_counts().to_dict() == {"PA": 10, "AP": 10}
    certificate = json.loads((out / "site" / "to_label.SELECTION.json").read_text())
    assert certificate["mode"] == "site" and certificate["constraints"]["dedup"] == 0.999
    groups = certificate["pool"]["duplicate_groups"]
    assert sum(path.endswith("-imported-again") for group in groups for path in group) == 4, groups
    tasks = json.loads((out / "site" / "label-studio" / "tasks.json").read_text())
    assert len(tasks) == 20 and all("score" in task["data"] for task in tasks)
    assert len((out / "site" / "cvat" / "images" / "manifest.jsonl").read_text().splitlines()) == 2 + 20
    assert reset_demo_dir(out) == out and [p.name for p in out.iterdir()] == [".xsel-demo"], "a demo may be rebuilt"


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, cli):
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "labels.csv").write_text("Path\nmine.png\n")  # a common name is no proof of a demo
    result = cli("demo", "--out", tmp_path, "-q")
    assert result.exit_code == 2 and "holds no xsel demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_run_demo_refuses_too_few_images_before_writing(tmp_path):
    """The library call checks the image count itself (a notebook calls it without the CLI)."""
    from xsel.demo import MIN_IMAGES, run_demo
    from xsel.errors import InputError

    with pytest.raises(InputError, match=f"use at least {MIN_IMAGES}"):
        run_demo(tmp_path / "demo", n_images=MIN_IMAGES - 1)
    assert not (tmp_path / "demo").exists()
