"""`xsel embed --engine ray`: the same store as the local engine, on a local Ray instance started here."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import interrupt_embedding, write_png_folder
from xsel.embed import embed
from xsel.store import errors_path, read_store

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'xsel[ray]')")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    csv = write_png_folder(folder, 300, size=48)
    (folder / "img" / "0007.png").write_bytes(b"broken")
    (folder / "img" / "0250.png").unlink()
    return csv


@pytest.mark.parametrize(("encoder", "options"), [("pixels", {}), ("resnet18", {"weights": "none", "image_size": 32})])
def test_ray_and_local_engines_write_the_same_store(images, tmp_path, encoder, options):
    local = embed(images, tmp_path / "local.h5", encoder=encoder, show_progress=False, **options)
    distributed = embed(
        images, tmp_path / "ray.h5", encoder=encoder, engine="ray", batch_size=16, show_progress=False, **options
    )
    assert (local.embedded, local.failed) == (distributed.embedded, distributed.failed) == (298, 2)
    a, b = read_store(tmp_path / "local.h5"), read_store(tmp_path / "ray.h5")
    assert a.paths == b.paths and a.meta.equals(b.meta)
    assert np.allclose(a.embeddings, b.embeddings, atol=1e-5)
    assert a.attrs["weights_sha256"] == b.attrs["weights_sha256"]
    errors = [pd.read_csv(errors_path(tmp_path / f"{name}.h5")) for name in ("local", "ray")]
    assert errors[0].equals(errors[1]) and errors[0]["Path"].tolist() == ["img/0007.png", "img/0250.png"]


def test_ray_resumes_a_run_the_local_engine_started(images, tmp_path, monkeypatch):
    interrupt_embedding(
        monkeypatch,
        2,
        lambda: embed(images, tmp_path / "s.h5", encoder="pixels", chunk_rows=64, workers=0, show_progress=False),
    )
    resumed = embed(
        images, tmp_path / "s.h5", encoder="pixels", chunk_rows=64, engine="ray", resume=True, show_progress=False
    )
    assert resumed.resumed_rows == 128 and resumed.embedded == 298
    reference = embed(images, tmp_path / "ref.h5", encoder="pixels", show_progress=False)
    assert np.allclose(read_store(tmp_path / "s.h5").embeddings, read_store(reference.store).embeddings, atol=1e-6)


def test_cli_engine_ray(images, tmp_path, cli):
    result = cli("embed", images, "--out", tmp_path / "s.h5", "--encoder", "pixels", "--engine", "ray", "-q")
    assert result.exit_code == 0, result.output
    assert "on ray (local cluster)" in result.stdout


def test_missing_ray_says_how_to_install(images, tmp_path):
    code = (
        "import sys\nsys.modules['ray'] = None\nfrom typer.testing import CliRunner\nfrom xsel.cli import app\n"
        f"r = CliRunner().invoke(app, ['embed', {str(images)!r}, '--out', {str(tmp_path / 'x.h5')!r}, "
        "'--encoder', 'pixels', '--engine', 'ray', '-q'])\nprint(r.exit_code, r.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("2 ") and "pip install 'xsel[ray]'" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
