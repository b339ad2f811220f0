"""ONNX bundles: export with parity checks, verification on load, and the torch-free site runtime."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from tests.conftest import write_png_folder
from xsel.bundle import Bundle
from xsel.errors import InputError
from xsel.selection import select
from xsel.site import site_select
from xsel.train.export import export_bundle
from xsel.train.medselect import SelectorConfig
from xsel.train.selector import train_selector

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("torch is blocked: the site runtime must not need it")
sys.meta_path.insert(0, _BlockTorch())
"""


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory):
    """A small learned selector on the pixels demo store, and a bundle with it."""
    folder = tmp_path_factory.mktemp("export")
    config = SelectorConfig(
        conditions=["Cardiomegaly", "Pleural Effusion"],
        val_conditions=["Lung Opacity"],
        k=5,
        pool_size=60,
        query_size=20,
        episodes=64,
        batch_size=8,
        hidden=16,
        val_every=4,
        val_episodes=4,
    )
    train_selector(demo_store, folder / "run", config, show_progress=False)
    bundle = folder / "bundle"
    export_bundle(bundle, encoder="pixels", selector=folder / "run" / "selector.pt")
    return folder / "run" / "selector.pt", bundle


@pytest.fixture
def bundle_copy(trained, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(trained[1], target)
    return target


def test_manifest_lists_everything_a_site_needs(trained):
    bundle = Bundle.load(trained[1])
    manifest = bundle.manifest
    assert manifest["schema_version"] == 2 and manifest["opset"] >= 17
    assert manifest["selector"]["name"] == "medselect" and manifest["selector"]["features"]["metadata"] == []
    assert manifest["encoder"]["preprocessing"] == {"image_size": 128, "channels": 1, "mean": [0.0], "std": [1.0]}
    assert set(manifest["sha256"]) == {"encoder.onnx", "selector.onnx", "trust_reference.npy"}
    assert manifest["parity"]["passed"] and len(manifest["parity"]["encoder"]) == 2
    pools = [check["case"] for check in manifest["parity"]["selector"]]
    assert pools == ["selector pool 7", "selector pool 61", "selector pool 250"]
    assert all(check["max_abs_diff"] < 1e-4 for check in manifest["parity"]["selector"])
    props = {p.key: json.loads(p.value) for p in onnx.load(str(trained[1] / "selector.onnx")).metadata_props}
    assert props["xsel_encoder"]["name"] == "pixels"


def test_site_selects_what_the_workstation_selects(trained, demo_store, tmp_path):
    csv = demo_store.parent / "labels.csv"
    site = site_select(csv, trained[1], 12, out=tmp_path / "s.csv", show_progress=False)
    workstation = select(demo_store, 12, checkpoint=trained[0])
    assert site.table["Path"].tolist() == workstation.table["Path"].tolist()
    assert (site.table["score"] - workstation.table["score"]).abs().max() < 1e-4


def test_site_cli_runs_without_torch(trained, demo_store, tmp_path):
    code = BLOCK_TORCH + (
        "from typer.testing import CliRunner\nfrom xsel.cli import app\n"
        f"r = CliRunner().invoke(app, ['select', {str(demo_store.parent / 'labels.csv')!r}, '--bundle', "
        f"{str(trained[1])!r}, '--k', '6', '--out', {str(tmp_path / 'site.csv')!r}, '-q'])\n"
        "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr
    assert len(pd.read_csv(tmp_path / "site.csv")) == 6


def test_store_is_kept_and_reused(trained, demo_store, tmp_path):
    csv = demo_store.parent / "labels.csv"
    first = site_select(csv, trained[1], 5, out=tmp_path / "a.csv", store=tmp_path / "site.h5", show_progress=False)
    assert (tmp_path / "site.h5").is_file()
    import xsel.bundle

    encode = xsel.bundle.Bundle.embed_files
    xsel.bundle.Bundle.embed_files = None  # a reused store must not encode again
    try:
        again = site_select(csv, trained[1], 5, out=tmp_path / "b.csv", store=tmp_path / "site.h5")
    finally:
        xsel.bundle.Bundle.embed_files = encode
    assert again.table["Path"].tolist() == first.table["Path"].tolist()
    other = write_png_folder(tmp_path / "other", 4)
    with pytest.raises(InputError, match="holds the embeddings of another CSV"):
        site_select(other, trained[1], 5, out=tmp_path / "c.csv", store=tmp_path / "site.h5")


def test_baselines_run_on_an_encoder_only_bundle(demo_store, tmp_path, cli):
    export_bundle(tmp_path / "enc", encoder="pixels")
    csv = demo_store.parent / "labels.csv"
    refused = cli("select", csv, "--bundle", tmp_path / "enc", "--k", "5", "--out", tmp_path / "s.csv", "-q")
    assert refused.exit_code == 2 and "holds no learned selector" in refused.stderr
    result = cli(
        "select",
        csv,
        "--bundle",
        tmp_path / "enc",
        "--k",
        "5",
        "--out",
        tmp_path / "s.csv",
        "--selector",
        "typiclust",
        "-q",
    )
    assert result.exit_code == 0, result.output
    workstation = select(demo_store, 5, selector="typiclust")
    assert pd.read_csv(tmp_path / "s.csv")["Path"].tolist() == workstation.table["Path"].tolist()


def test_undecodable_images_are_skipped_and_listed(trained, tmp_path):
    csv = write_png_folder(tmp_path / "imgs", 8)
    (tmp_path / "imgs" / "img" / "0003.png").write_bytes(b"broken")
    out = tmp_path / "sel.csv"
    result = site_select(csv, trained[1], 20, out=out, show_progress=False)
    errors = pd.read_csv(tmp_path / "sel.csv.errors.csv")
    assert errors["Path"].tolist() == ["img/0003.png"]
    assert len(result.table) == 4, "8 images, 7 readable, one per patient (pairs share a PatientID)"
    assert any("larger than the pool" in w for w in result.warnings)


def test_encoder_export_parity_for_a_cnn(tmp_path):
    manifest = export_bundle(tmp_path / "r18", encoder="resnet18", weights="none", image_size=32)
    assert all(check["max_abs_diff"] < 1e-3 for check in manifest["parity"]["encoder"])
    assert manifest["selector"] is None and manifest["encoder"]["embedding_dim"] == 512


def _tamper(bundle: Path, how: str) -> None:
    if how == "modified":
        data = bytearray((bundle / "selector.onnx").read_bytes())
        data[-10] ^= 0xFF
        (bundle / "selector.onnx").write_bytes(bytes(data))
    elif how == "missing":
        (bundle / "encoder.onnx").unlink()
    elif how == "newer":
        manifest = json.loads((bundle / "manifest.json").read_text())
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3}))
    elif how == "not json":
        (bundle / "manifest.json").write_text("{oops")
    elif how == "newer preprocessing":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["encoder"]["preprocessing"]["letterbox"] = True
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    elif how == "bad preprocessing value":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["encoder"]["preprocessing"]["crop"] = "top"
        (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("modified", "selector.onnx: SHA-256 does not match the manifest"),
        ("missing", "encoder.onnx is missing"),
        ("newer", "bundle schema 3, this xsel reads schemas 1 and 2"),
        ("not json", "manifest.json: not valid JSON"),
        ("newer preprocessing", "needs preprocessing this xsel does not know (letterbox)"),
        ("bad preprocessing value", "manifest.json: encoder preprocessing: crop 'top' is not supported"),
    ],
)
def test_a_tampered_or_incomplete_bundle_is_refused(bundle_copy, demo_store, tmp_path, cli, how, message):
    _tamper(bundle_copy, how)
    result = cli(
        "select",
        demo_store.parent / "labels.csv",
        "--bundle",
        bundle_copy,
        "--k",
        "3",
        "--out",
        tmp_path / "s.csv",
        "-q",
    )
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr  # one line, no traceback
    assert not (tmp_path / "s.csv").exists()


def test_store_from_another_encoder_is_refused(trained, demo_store, tmp_path, cli):
    from xsel.embed import embed

    csv = demo_store.parent / "labels.csv"
    other = tmp_path / "r18.h5"
    embed(csv, other, encoder="resnet18", weights="none", image_size=32, show_progress=False)
    result = cli("select", csv, "--bundle", trained[1], "--k", "3", "--out", tmp_path / "s.csv", "--store", other, "-q")
    assert result.exit_code == 2 and "was made by resnet18" in result.stderr and "encodes with pixels" in result.stderr


def test_export_refusals(trained, tmp_path, cli):
    result = cli("export", "--encoder", "pixels", "--out", trained[1])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    mismatch = cli(
        "export", "--encoder", "resnet18", "--weights", "none", "--selector", trained[0], "--out", tmp_path / "b"
    )
    assert mismatch.exit_code == 2 and "trained on embeddings of pixels" in mismatch.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="a CUDA provider exists"
)
def test_device_cuda_without_a_cuda_provider_is_an_error(trained, demo_store, tmp_path, cli):
    result = cli(
        "select",
        demo_store.parent / "labels.csv",
        "--bundle",
        trained[1],
        "--k",
        "3",
        "--out",
        tmp_path / "s.csv",
        "--device",
        "cuda",
        "-q",
    )
    assert result.exit_code == 2 and "--device cuda" in result.stderr


@pytest.mark.slow
def test_site_install_without_torch_selects_the_same_paths(trained, demo_store, tmp_path):
    """A fresh, non-editable environment with only the `cpu` extra runs the bundle exported in this test run."""
    venv = tmp_path / "site-venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", f"{ROOT}[cpu]"], capture_output=True, text=True, timeout=1200
    )
    assert install.returncode == 0, install.stderr[-2000:]
    freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in freeze and "onnxruntime" in freeze
    out = tmp_path / "site.csv"
    run = subprocess.run(
        [
            venv / "bin" / "xsel",
            "select",
            demo_store.parent / "labels.csv",
            "--bundle",
            trained[1],
            "--k",
            "15",
            "--out",
            out,
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "XSEL_LOAD_PLUGINS": ""},
    )
    assert run.returncode == 0, run.stderr
    workstation = select(demo_store, 15, checkpoint=trained[0])
    assert pd.read_csv(out)["Path"].tolist() == workstation.table["Path"].tolist()


class TinyLearnedSelector:
    """A third-party learned selector: a linear scorer over the embedding and the z-scored age."""

    uses_labels = False

    def __init__(self, checkpoint=None):
        import torch

        from xsel.selectors import PoolFeatures
        from xsel.store import read_store

        store = read_store(checkpoint)  # the "checkpoint" here is the store it was fitted on
        self.encoder_identity = store.encoder_identity
        self.pool_features = PoolFeatures(metadata=("age",), age_mean=50.0, age_std=10.0)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.module = torch.nn.Sequential(
                torch.nn.Linear(self.pool_features.width(store.embeddings.shape[1]), 1), torch.nn.Flatten(-2)
            ).eval()

    def scorer(self):
        return self.module

    def scores(self, embeddings, metadata=None):
        import torch

        with torch.inference_mode():
            inputs = torch.from_numpy(self.pool_features.inputs(embeddings, metadata))[None]
            return self.module(inputs)[0].numpy()

    def select(self, embeddings, k, *, seed, metadata=None):
        return np.argsort(-self.scores(embeddings, metadata), kind="stable")[: min(k, len(embeddings))]


def test_any_learned_selector_plugin_exports_and_runs_at_a_site(demo_store, tmp_path):
    """The bundle names the plugin and its input features; the site prepares them and runs it with no plugin code."""
    from xsel import hookimpl, plugins

    class Plugin:
        @hookimpl
        def register_selectors(self, register):
            register("tiny-learned", TinyLearnedSelector, description="test: a linear learned selector")

    plugins.register_plugin(Plugin(), name="tiny-learned-plugin")
    try:
        manifest = export_bundle(tmp_path / "b", encoder="pixels", selector=f"tiny-learned={demo_store}")
        workstation = select(demo_store, 9, selector="tiny-learned", checkpoint=demo_store)
    finally:
        plugins.unregister_plugin("tiny-learned-plugin")
    entry = manifest["selector"]
    assert entry["name"] == "tiny-learned" and entry["plugin"] == "tiny-learned-plugin"
    assert entry["features"] == {"metadata": ["age"], "age_mean": 50.0, "age_std": 10.0}
    assert entry["input_dim"] == entry["embedding_dim"] + 1
    site = site_select(demo_store.parent / "labels.csv", tmp_path / "b", 9, out=tmp_path / "s.csv", show_progress=False)
    assert site.table["selector"].iloc[0] == "tiny-learned"
    assert site.table["Path"].tolist() == workstation.table["Path"].tolist()
    assert (site.table["score"] - workstation.table["score"]).abs().max() < 1e-4


def test_a_baseline_is_not_exportable(demo_store, tmp_path):
    with pytest.raises(InputError, match="'typiclust' cannot be exported"):
        export_bundle(tmp_path / "b", encoder="pixels", selector="typiclust=whatever")
    assert not (tmp_path / "b").exists()


def test_a_schema_1_bundle_still_runs(bundle_copy, trained, demo_store, tmp_path):
    """Bundles written before the selector entry became generic load, their MedSelect entry read as schema 2."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    entry = manifest["selector"]
    legacy = {key: value for key, value in entry.items() if key not in ("features", "details", "plugin", "version")}
    legacy |= {"use_metadata": False, "age_mean": 0.0, "age_std": 1.0, "trained_k": 5, "conditions": ["Edema"]}
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1, "selector": legacy}))
    site = site_select(demo_store.parent / "labels.csv", bundle_copy, 12, out=tmp_path / "s.csv", show_progress=False)
    workstation = select(demo_store, 12, checkpoint=trained[0])
    assert site.table["Path"].tolist() == workstation.table["Path"].tolist()


def test_site_selection_with_constraints_certificate_and_report_verifies(trained, demo_store, tmp_path, cli):
    out = tmp_path / "site.csv"
    result = cli(
        "select", demo_store.parent / "labels.csv", "--bundle", trained[1], "--k", "8", "--out", out,
        "--store", tmp_path / "site.h5", "--balance", "View", "--dedup", "0.999", "--report", tmp_path / "r.html", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "site.SELECTION.json").read_text())
    assert record["mode"] == "site" and record["inputs"]["bundle"]["sha256"] and record["inputs"]["images"]["sha256"]
    assert record["selector"]["name"] == "medselect" and record["strata"]
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64") >= 8
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "self-contained: nothing is fetched"
    verified = cli("select", "--verify", tmp_path / "site.SELECTION.json", "-q")
    assert verified.exit_code == 0 and "all 8 picks were reproduced" in verified.stdout, verified.output


def test_int8_bundle_checks_its_learned_selector(trained, demo_store, tmp_path):
    csv = demo_store.parent / "labels.csv"
    out = tmp_path / "int8"
    # the default 200 calibration images: on 60, one of the toy selector's 20 picks moves (90% < the 95% required)
    manifest = export_bundle(out, encoder="pixels", selector=trained[0], quantize="int8", calibration=csv)
    assert manifest["quantization"]["agreement"]["selector"] == "medselect"
    assert manifest["quantization"]["agreement"]["picks_unchanged"] >= 0.95
    site = site_select(csv, out, 12, out=tmp_path / "s.csv", show_progress=False)
    assert len(site.table) == 12 and site.record["selector_source"]["bundle"] == str(out)
