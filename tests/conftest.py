"""Shared fixtures: small image folders written per test, the real-X-ray pack when present, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from xsel.cli import app

QUICK_EVALUATION = ["--episodes", "3", "--pool-size", "60", "--query-size", "20", "--k", "5", "-q"]
REALCXR = Path(os.environ.get("XSEL_REALCXR", Path(__file__).resolve().parents[2] / "shared" / "data" / "realcxr"))


def write_png_folder(folder: Path, n: int, *, size: int = 40, seed: int = 0, extra: dict | None = None) -> Path:
    """``n`` random gray PNGs plus ``images.csv`` (Path, PatientID, Age, Sex, Label); returns the CSV path."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img/{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / name)
        rows.append({"Path": name, "PatientID": f"p{i // 2}", "Age": 20 + i, "Sex": "MF"[i % 2], "Label": i % 3 - 1})
    frame = pd.DataFrame(rows)
    for column, values in (extra or {}).items():
        frame[column] = values
    csv = folder / "images.csv"
    frame.to_csv(csv, index=False)
    return csv


@pytest.fixture
def png_csv(tmp_path: Path) -> Path:
    return write_png_folder(tmp_path / "data", 12)


@pytest.fixture(scope="session", autouse=True)
def encoder_cache(tmp_path_factory):
    """Exported encoders (``xsel embed --runtime auto``) go to a cache of the test session, never to ~/.cache; it is
    set in the environment so subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("encoder-cache")
    previous = os.environ.get("XSEL_CACHE_DIR")
    os.environ["XSEL_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XSEL_CACHE_DIR", None)
    else:
        os.environ["XSEL_CACHE_DIR"] = previous


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("embed", ...)`` → click Result (exit_code, stdout, stderr, output)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on cores shared with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def realcxr() -> Path:
    if not (REALCXR / "labels.csv").is_file():
        pytest.skip(f"real chest X-ray pack not found at {REALCXR} (set XSEL_REALCXR)")
    return REALCXR


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """A labelled store: 300 synthetic demo images (with follow-up images per patient), pixels encoder."""
    from xsel.demo import generate_demo_data
    from xsel.embed import embed

    folder = tmp_path_factory.mktemp("demo")
    csv = generate_demo_data(folder, n_images=300, image_size=64, seed=1)
    embed(csv, folder / "demo.h5", encoder="pixels", workers=0, show_progress=False)
    return folder / "demo.h5"


def interrupt_embedding(monkeypatch, after_blocks: int, run) -> list[int]:
    """Run ``run()`` with the shard writer raising KeyboardInterrupt once ``after_blocks`` shards are on disk,
    as a Ctrl-C mid-run would; returns the block starts that were written."""
    import xsel.embed as module

    real, written = module._write_shard, []

    def write_then_stop(partial, start, *args):
        if len(written) == after_blocks:
            raise KeyboardInterrupt
        written.append(start)
        real(partial, start, *args)

    with monkeypatch.context() as patch:
        patch.setattr(module, "_write_shard", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run()
    return written
