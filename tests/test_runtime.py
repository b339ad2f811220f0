"""`xsel embed --runtime auto|torch|onnx`: auto takes onnxruntime when it can, the exported encoder is cached per
encoder identity and never trusted blindly, and every case that cannot use it falls back to PyTorch and says why."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import interrupt_embedding
from xsel.embed import embed
from xsel.errors import XselError
from xsel.store import read_store
from xsel.train import export, inference
from xsel.train.export import ATOL, RTOL

pytest.importorskip("onnxruntime")
RESNET = {"encoder": "resnet18", "weights": "none", "image_size": 32}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own encoder cache."""
    monkeypatch.setenv("XSEL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def exports(monkeypatch):
    """Counts the ONNX exports (each is an export plus its parity check)."""
    real, calls = export.export_encoder, []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_encoder", counted)
    return calls


def test_auto_runs_onnxruntime_and_matches_torch(png_csv, tmp_path):
    auto = embed(png_csv, tmp_path / "a.h5", show_progress=False, **RESNET)
    torch_run = embed(png_csv, tmp_path / "t.h5", runtime="torch", show_progress=False, **RESNET)
    assert (auto.runtime, torch_run.runtime) == ("onnx", "torch")
    a, t = read_store(auto.store), read_store(torch_run.store)
    assert a.paths == t.paths and np.allclose(a.embeddings, t.embeddings, rtol=RTOL, atol=ATOL)
    assert a.attrs["encoder_options"] == t.attrs["encoder_options"], "same store, whichever runtime ran"


def test_the_exported_encoder_is_cached_and_reused(png_csv, tmp_path, exports, cache):
    embed(png_csv, tmp_path / "1.h5", show_progress=False, **RESNET)
    second = embed(png_csv, tmp_path / "2.h5", runtime="onnx", show_progress=False, **RESNET)
    assert second.runtime == "onnx" and len(exports) == 1, "the second run does not export"
    (folder,) = (cache / "encoders").iterdir()
    record = json.loads((folder / "encoder.json").read_text())
    assert record["identity"]["encoder"] == "resnet18" and record["parity"]["passed"]
    assert [check["case"] for check in record["parity"]["encoder"]] == ["encoder batch 1", "encoder batch 3"]
    assert not list(folder.glob(".*tmp*")), "no temporary left behind"
    embed(png_csv, tmp_path / "3.h5", show_progress=False, **{**RESNET, "image_size": 40})
    assert len(exports) == 2 and len(list((cache / "encoders").iterdir())) == 2, "another identity, another export"


@pytest.mark.parametrize("tamper", ["model", "identity", "record"])
def test_a_tampered_cache_is_exported_again(png_csv, tmp_path, exports, cache, cli, tamper):
    embed(png_csv, tmp_path / "1.h5", encoder="pixels", show_progress=False)
    (folder,) = (cache / "encoders").iterdir()
    record_file = folder / "encoder.json"
    if tamper == "model":
        with open(folder / "encoder.onnx", "ab") as handle:
            handle.write(b"\0")
    elif tamper == "identity":
        record = json.loads(record_file.read_text())
        record["identity"]["weights_sha256"] = "0" * 64
        record_file.write_text(json.dumps(record))
    else:
        record_file.write_text("{not json")
    result = cli("embed", png_csv, "--out", tmp_path / "2.h5", "--encoder", "pixels", "-q")
    assert result.exit_code == 0, result.output
    assert "is not used" in result.stderr and "exporting it again" in result.stderr
    assert "with onnx" in result.stdout and len(exports) == 2
    assert not inference._cache_problem(folder, json.loads(record_file.read_text())["identity"], "cpu")


def test_auto_with_bf16_runs_torch_and_says_why(png_csv, tmp_path, cli, exports):
    result = cli("embed", png_csv, "--out", tmp_path / "s.h5", "--encoder", "pixels", "--precision", "bf16", "-q")
    assert result.exit_code == 0, result.output
    assert "--runtime auto: bfloat16 precision runs with PyTorch" in result.stderr
    assert "on cpu with torch" in result.stdout and exports == []


def test_auto_falls_back_when_the_export_fails_and_onnx_refuses(png_csv, tmp_path, cli, monkeypatch):
    def fails(*args, **kwargs):
        raise XselError("parity check failed for encoder batch 1")

    monkeypatch.setattr(export, "export_encoder", fails)
    auto = cli("embed", png_csv, "--out", tmp_path / "a.h5", "--encoder", "pixels", "-q")
    assert auto.exit_code == 0, auto.output
    assert "the ONNX encoder is not usable (parity check failed" in auto.stderr and "with torch" in auto.stdout
    onnx = cli("embed", png_csv, "--out", tmp_path / "o.h5", "--encoder", "pixels", "--runtime", "onnx", "-q")
    assert onnx.exit_code == 1 and "parity check failed" in onnx.stderr
    assert not (tmp_path / "o.h5").exists()


def test_auto_without_onnxruntime_runs_torch(png_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    assert embed(png_csv, tmp_path / "s.h5", encoder="pixels", show_progress=False).runtime == "torch"


def test_bad_runtime_is_a_usage_error(png_csv, tmp_path, cli):
    result = cli("embed", png_csv, "--out", tmp_path / "s.h5", "--runtime", "tensorrt")
    assert result.exit_code == 2 and "tensorrt" in result.output
    with pytest.raises(XselError, match="--runtime tensorrt: choose auto, torch or onnx"):
        embed(png_csv, tmp_path / "s.h5", runtime="tensorrt", show_progress=False)


def test_the_job_records_the_runtime_and_a_resume_may_switch_it(tmp_path, monkeypatch):
    from tests.conftest import write_png_folder

    csv = write_png_folder(tmp_path / "data", 12)
    out = tmp_path / "s.h5"
    options = {"batch_size": 4, "chunk_rows": 4, "workers": 0, "show_progress": False, **RESNET}
    assert interrupt_embedding(monkeypatch, 1, lambda: embed(csv, out, **options)) == [0]
    assert json.loads((tmp_path / "s.h5.partial" / "job.json").read_text())["runtime"] == "onnx"
    resumed = embed(csv, out, resume=True, runtime="torch", **options)
    assert (resumed.runtime, resumed.resumed_rows) == ("torch", 4)
    fresh = embed(csv, tmp_path / "f.h5", runtime="torch", **options)
    assert np.allclose(read_store(out).embeddings, read_store(fresh.store).embeddings, rtol=RTOL, atol=ATOL)
