"""int8 bundles: static quantization calibrated on the researcher's images, accepted only when the site selection
agrees with the fp32 encoder's, and run by the unchanged site runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from xsel.bundle import Bundle
from xsel.errors import XselError
from xsel.site import site_select
from xsel.train import export
from xsel.train.export import export_bundle


@pytest.fixture(scope="module")
def int8_bundle(demo_store, tmp_path_factory):
    """The pixels encoder quantized on 60 of the demo images, with the default agreement check."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    csv = demo_store.parent / "labels.csv"
    export_bundle(out, encoder="pixels", quantize="int8", calibration=csv, calibration_images=60)
    return out


def test_manifest_records_the_quantization_and_the_site_runs_it(int8_bundle, demo_store, tmp_path):
    out = int8_bundle
    quantization = Bundle.load(out).manifest["quantization"]
    assert quantization["precision"] == "int8" and quantization["format"] == "QDQ"
    assert quantization["calibration"]["images"] == 60 and quantization["calibration"]["source"] == "labels.csv"
    assert len(quantization["calibration"]["source_sha256"]) == 64
    agreement = quantization["agreement"]
    assert agreement["selector"] == "typiclust" and agreement["k"] == 20 and agreement["pool"] == 60
    assert agreement["picks_unchanged"] >= agreement["required"] == 0.95 and agreement["cosine_min"] > 0.99
    assert sorted(path.name for path in out.iterdir()) == ["encoder.onnx", "manifest.json"]
    ops = {node.op_type for node in onnx.load(str(out / "encoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    csv = demo_store.parent / "labels.csv"
    result = site_select(csv, out, 8, out=tmp_path / "s.csv", selector="typiclust", show_progress=False)
    assert len(result.table) == 8


def test_a_failed_agreement_writes_no_bundle(demo_store, tmp_path, monkeypatch):
    real_encode = export._encode

    def scrambled_int8(path, entry, sample):  # an int8 encoder that lost the images' geometry
        embeddings = real_encode(path, entry, sample)
        return embeddings if path.name == "encoder.onnx" else np.random.default_rng(0).permutation(embeddings)

    monkeypatch.setattr(export, "_encode", scrambled_int8)
    with pytest.raises(
        XselError, match=r"int8 check failed: \d+% of the K=20 typiclust picks .* no bundle was written"
    ):
        export_bundle(
            tmp_path / "b",
            encoder="pixels",
            quantize="int8",
            calibration=demo_store.parent / "labels.csv",
            calibration_images=40,
        )
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4"], "--quantize int4: choose int8"),
        (["--quantize", "int8"], "needs --calibration"),
        (["--quantize", "int8", "--calibration", "missing.csv"], "file or folder not found"),
        (["--quantize", "int8", "--calibration", "CSV", "--calibration-images", "10"], "use at least 40"),
        (["--quantize", "int8", "--calibration", "CSV", "--min-agreement", "1.5"], "(0 records it only)"),
        (["--calibration", "CSV"], "--calibration applies to --quantize int8"),
        (["--quantize", "int8", "--calibration", "EMPTY"], "no 'Path' column"),
    ],
)
def test_bad_quantization_options_exit_2(demo_store, tmp_path, cli, args, message):
    (tmp_path / "empty.csv").write_text("Image\nx.png\n")  # a list without a Path column: refused before export
    named = {"CSV": str(demo_store.parent / "labels.csv"), "EMPTY": str(tmp_path / "empty.csv")}
    args = [named.get(arg, arg) for arg in args]
    result = cli("export", "--encoder", "pixels", "--out", tmp_path / "b", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "b").exists()


def test_cli_reports_the_agreement(demo_store, tmp_path, cli):
    csv = demo_store.parent / "labels.csv"
    result = cli(
        "export",
        "--encoder",
        "pixels",
        "--out",
        tmp_path / "b",
        "--quantize",
        "int8",
        "--calibration",
        csv,
        "--calibration-images",
        "40",
        "--min-agreement",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert "Encoder quantized to int8 on 40 calibration images" in result.stdout
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["quantization"]["agreement"]["required"] == 0
