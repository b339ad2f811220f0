"""`xsel embed`: the store's contents, errors file, resume after a crash, and every bad-input case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import interrupt_embedding, write_png_folder
from xsel.embed import embed
from xsel.encoders import create_encoder
from xsel.errors import XselError
from xsel.io.decoding import BatchDecoder
from xsel.io.images import load_image
from xsel.store import errors_path, read_store


def test_store_holds_embeddings_paths_meta_and_provenance(png_csv, tmp_path):
    out = tmp_path / "pool.h5"
    result = embed(png_csv, out, encoder="pixels", workers=0, show_progress=False)
    store = read_store(out)
    frame = pd.read_csv(png_csv)
    assert (result.embedded, result.failed) == (12, 0)
    assert store.embeddings.shape == (12, 1024) and store.embeddings.dtype == np.float32
    assert store.paths == frame["Path"].tolist()
    assert store.meta["PatientID"].tolist() == frame["PatientID"].tolist()
    assert np.array_equal(store.meta["Label"].to_numpy(), frame["Label"].to_numpy(dtype=float))
    attrs = store.attrs
    assert attrs["schema_version"] == 1 and attrs["encoder"] == "pixels"
    assert attrs["preprocessing"] == {"image_size": 128, "channels": 1, "mean": [0.0], "std": [1.0]}
    assert len(attrs["weights_sha256"]) == 64 and len(attrs["source_csv_sha256"]) == 64
    assert {"xsel_version", "created", "encoder_options"} <= set(attrs)
    with h5py.File(out) as handle:  # the format other tools read
        assert handle["embeddings"].chunks is not None and handle["embeddings"].maxshape[0] is None


def test_embeddings_equal_the_encoder_on_each_image(png_csv, tmp_path):
    embed(
        png_csv,
        tmp_path / "s.h5",
        encoder="resnet18",
        weights="none",
        image_size=32,
        batch_size=5,
        show_progress=False,
    )
    store = read_store(tmp_path / "s.h5")
    model = create_encoder("resnet18", "none", image_size=32)
    with torch.inference_mode():
        one = model(torch.from_numpy(load_image(png_csv.parent / store.paths[7], model.preprocessing))[None])
    assert np.allclose(store.embeddings[7], one.numpy()[0], atol=1e-4)


def test_bad_images_are_skipped_and_listed(tmp_path):
    csv = write_png_folder(tmp_path, 6)
    (tmp_path / "img" / "0002.png").write_bytes(b"broken")
    (tmp_path / "img" / "0004.png").unlink()
    result = embed(csv, tmp_path / "s.h5", encoder="pixels", batch_size=4, show_progress=False)
    assert (result.embedded, result.failed) == (4, 2)
    store = read_store(tmp_path / "s.h5")
    assert store.paths == ["img/0000.png", "img/0001.png", "img/0003.png", "img/0005.png"]
    assert store.meta["Age"].tolist() == [20, 21, 23, 25]
    errors = pd.read_csv(errors_path(tmp_path / "s.h5"))
    assert errors["Path"].tolist() == ["img/0002.png", "img/0004.png"]
    assert "cannot decode" in errors["error"][0] and "not found" in errors["error"][1]


@pytest.mark.parametrize("workers, overlap", [(0, False), (2, False), (2, True)])
def test_batch_decoder_yields_the_asked_rows_in_order_and_failures_apart(tmp_path, workers, overlap):
    csv = write_png_folder(tmp_path, 9, size=24)
    files = [tmp_path / path for path in pd.read_csv(csv)["Path"]]
    files[3].write_bytes(b"broken")
    files[7].unlink()
    preprocessing = {"image_size": 16, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}
    rows_asked = [0, 2, 3, 4, 5, 7, 8]  # row 1 and 6 are not asked for (a resumed run)
    decoder = BatchDecoder(preprocessing, batch_size=3, workers=workers, overlap=overlap)
    with decoder:
        folder = decoder._folder
        seen, errors = [], []
        for rows, pixels, failed in decoder.batches(files, rows_asked):
            assert pixels.shape == (len(rows), 3, 16, 16)
            for row, array in zip(rows.tolist(), pixels, strict=True):  # read before the next batch is asked for
                assert np.array_equal(array, load_image(files[row], preprocessing))
            seen.extend(rows.tolist())
            errors.extend(failed)
    assert seen == [0, 2, 4, 5, 8]
    assert [row for row, _ in errors] == [3, 7]
    assert "cannot decode" in errors[0][1] and "not found" in errors[1][1]
    assert not folder.exists()  # the shared buffers go with the decoder


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="space is reserved with posix_fallocate")
def test_a_full_shared_memory_falls_back_to_the_temporary_folder(tmp_path, monkeypatch):
    """A container's /dev/shm is often 64 MiB; a write past a full tmpfs would kill the process, not raise."""
    import errno

    import xsel.io.decoding as decoding

    shm, real = tmp_path / "shm", os.posix_fallocate
    shm.mkdir()

    def full_in_shm(fd, offset, size):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(shm)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, size)

    monkeypatch.setattr(decoding, "SHARED_MEMORY", shm)
    monkeypatch.setattr(os, "posix_fallocate", full_in_shm)
    csv = write_png_folder(tmp_path / "data", 4)
    files = [tmp_path / "data" / path for path in pd.read_csv(csv)["Path"]]
    preprocessing = {"image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]}
    with BatchDecoder(preprocessing, batch_size=4, workers=0, overlap=True) as decoder:
        assert decoder._folder.parent != shm and not any(shm.iterdir())  # nothing left in the full one
        rows, pixels, _ = next(decoder.batches(files, range(4)))
        assert np.array_equal(pixels[2], load_image(files[2], preprocessing))


def test_a_decode_worker_that_dies_is_one_clear_error(tmp_path, monkeypatch):
    import xsel.io.decoding as decoding

    csv = write_png_folder(tmp_path, 6)
    files = [tmp_path / path for path in pd.read_csv(csv)["Path"]]
    real = decoding.decode_or_error
    monkeypatch.setattr(  # the forked workers inherit it
        decoding, "decode_or_error", lambda path, pre: os._exit(9) if path.endswith("0004.png") else real(path, pre)
    )
    preprocessing = {"image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]}
    decoder = BatchDecoder(preprocessing, batch_size=3, workers=2)
    with pytest.raises(XselError, match="decode worker process ended unexpectedly.*--workers 0"), decoder:
        list(decoder.batches(files, range(6)))


def test_cli_summary_and_errors_file(tmp_path, cli):
    csv = write_png_folder(tmp_path, 5)
    (tmp_path / "img" / "0001.png").write_bytes(b"broken")
    result = cli("embed", csv, "--out", tmp_path / "s.h5", "--encoder", "pixels", "-q")
    assert result.exit_code == 0, result.output
    assert "Embedded 4 of 5 images, 1 failed (listed in" in result.stdout
    assert errors_path(tmp_path / "s.h5").is_file()


def test_image_root_and_absolute_paths(tmp_path):
    write_png_folder(tmp_path / "root", 3)
    csv = tmp_path / "list.csv"
    absolute = str(tmp_path / "root" / "img" / "0002.png")
    pd.DataFrame({"Path": ["img/0000.png", "img/0001.png", absolute]}).to_csv(csv, index=False)
    embed(csv, tmp_path / "s.h5", encoder="pixels", image_root=tmp_path / "root", show_progress=False)
    assert read_store(tmp_path / "s.h5").paths == ["img/0000.png", "img/0001.png", absolute]


def test_image_size_option_is_recorded(png_csv, tmp_path):
    embed(png_csv, tmp_path / "s.h5", encoder="pixels", image_size=64, show_progress=False)
    assert read_store(tmp_path / "s.h5").attrs["preprocessing"]["image_size"] == 64


def test_example_plugin_through_the_cli(tmp_path, cli):
    csv = write_png_folder(tmp_path, 3)
    result = cli(
        "embed",
        csv,
        "--out",
        tmp_path / "s.h5",
        "--encoder",
        "efficientnet-lite0",
        "--image-size",
        "64",
        "-q",
    )
    assert result.exit_code == 0, result.output
    store = read_store(tmp_path / "s.h5")
    assert store.embeddings.shape == (3, 1280) and store.attrs["encoder"] == "efficientnet-lite0"
    assert np.isfinite(store.embeddings).all() and store.embeddings.std() > 0


def test_resume_after_an_interruption_embeds_only_the_missing_blocks(tmp_path, monkeypatch):
    csv = write_png_folder(tmp_path, 20)
    out = tmp_path / "s.h5"
    written = interrupt_embedding(
        monkeypatch,
        2,
        lambda: embed(csv, out, encoder="pixels", chunk_rows=4, batch_size=3, workers=0, show_progress=False),
    )
    assert not out.exists() and written == [0, 4]
    resumed = embed(csv, out, encoder="pixels", chunk_rows=4, batch_size=3, workers=0, resume=True, show_progress=False)
    assert resumed.resumed_rows == 8 and resumed.embedded == 20
    fresh = embed(csv, tmp_path / "fresh.h5", encoder="pixels", workers=0, show_progress=False)
    assert np.allclose(read_store(out).embeddings, read_store(fresh.store).embeddings, atol=1e-6)
    assert not out.with_name("s.h5.partial").exists()


def test_resume_refuses_a_partial_run_with_other_settings(tmp_path, monkeypatch):
    csv = write_png_folder(tmp_path, 8)
    import xsel.embed as embed_module

    monkeypatch.setattr(embed_module, "_write_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        embed(csv, tmp_path / "s.h5", encoder="pixels", workers=0, show_progress=False)
    monkeypatch.undo()
    from xsel.errors import InputError

    with pytest.raises(InputError, match="other settings.*--preprocessing"):
        embed(csv, tmp_path / "s.h5", encoder="pixels", image_size=64, resume=True, show_progress=False)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """kill -9 in the middle of a run, then resume: the store equals an uninterrupted run's."""
    csv = write_png_folder(tmp_path, 600, size=32)
    out, partial = tmp_path / "s.h5", tmp_path / "s.h5.partial"
    options = "encoder='resnet18', weights='none', image_size=48, batch_size=4, workers=0, chunk_rows=64, resume=True"
    code = f"from xsel.embed import embed\nr = embed({str(csv)!r}, {str(out)!r}, {options}, show_progress=False)"
    process = subprocess.Popen(
        [sys.executable, "-c", code + "; print(r.resumed_rows)"], stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while len(list(partial.glob("rows-*.npz"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    shards = [name.stem.split("-")[1:] for name in partial.glob("rows-*.npz")]  # rows-FIRST-LAST.npz
    done = sum(int(last) - int(first) + 1 for first, last in shards)
    assert len(shards) >= 2 and done < 600
    resumed = subprocess.run([sys.executable, "-c", code + "; print(r.resumed_rows)"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert int(resumed.stdout) == done, "only the rows no shard holds are embedded again"
    reference = embed(csv, tmp_path / "ref.h5", encoder="resnet18", weights="none", image_size=48, show_progress=False)
    assert np.allclose(read_store(out).embeddings, read_store(reference.store).embeddings, atol=1e-4)
    assert read_store(out).paths == read_store(reference.store).paths


def test_resume_on_a_complete_store_does_nothing(png_csv, tmp_path, cli):
    out = tmp_path / "s.h5"
    embed(png_csv, out, encoder="pixels", show_progress=False)
    before = out.stat().st_mtime_ns
    result = cli("embed", png_csv, "--out", out, "--encoder", "pixels", "--resume")
    assert result.exit_code == 0 and "already complete" in result.stdout
    assert out.stat().st_mtime_ns == before


def test_resume_without_partial_output_starts_from_scratch(png_csv, tmp_path):
    result = embed(png_csv, tmp_path / "s.h5", encoder="pixels", resume=True, show_progress=False)
    assert result.embedded == 12 and result.resumed_rows == 0


def test_overwrite_replaces_an_existing_store(png_csv, tmp_path, cli):
    out = tmp_path / "s.h5"
    embed(png_csv, out, encoder="pixels", show_progress=False)
    result = cli(
        "embed",
        png_csv,
        "--out",
        out,
        "--encoder",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--overwrite",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert read_store(out).attrs["encoder"] == "resnet18"


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    data = tmp / "data"
    good = write_png_folder(data, 3)
    (tmp / "empty.csv").write_text("")
    (tmp / "header.csv").write_text("Path,Label\n")
    pd.DataFrame({"File": ["a.png"]}).to_csv(tmp / "nopath.csv", index=False)
    pd.DataFrame({"Path": ["img/0000.png", "img/0001.png", "img/0000.png"]}).to_csv(data / "dup.csv", index=False)
    pd.DataFrame({"Path": ["img/0000.png", None]}).to_csv(data / "blank.csv", index=False)
    pd.DataFrame({"Path": ["gone1.png", "gone2.png"]}).to_csv(data / "allmissing.csv", index=False)
    (tmp / "exists.h5").write_bytes(b"old")
    (tmp / "garbage.pt").write_bytes(b"garbage")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp / "partial.pt")
    out = ["--out", str(tmp / "new.h5")]
    return [
        ([str(tmp / "missing.csv"), *out], "missing.csv: CSV file not found"),
        ([str(tmp / "empty.csv"), *out], "empty.csv: the CSV is empty"),
        ([str(tmp / "header.csv"), *out], "header.csv: the CSV has a header but no rows"),
        ([str(tmp / "nopath.csv"), *out], "nopath.csv: no 'Path' column (columns found: File)"),
        ([str(data / "dup.csv"), *out], "dup.csv: row 4, column 'Path' repeats 'img/0000.png' from row 2"),
        ([str(data / "blank.csv"), *out], "blank.csv: row 3, column 'Path' is empty"),
        ([str(data / "allmissing.csv"), *out, "--encoder", "pixels"], "none of the 2 images could be read"),
        ([str(good), "--out", str(tmp / "exists.h5")], "exists.h5 already exists; pass --overwrite"),
        ([str(good), *out, "--encoder", "resnet19"], "unknown encoder 'resnet19'; choose one of:"),
        ([str(good), *out, "--weights", str(tmp / "nope.pt")], "nope.pt: file not found"),
        (
            [str(good), *out, "--weights", str(tmp / "garbage.pt")],
            "garbage.pt: cannot read it as PyTorch weights",
        ),
        ([str(good), *out, "--weights", str(tmp / "partial.pt")], "does not fit ResNet (missing keys: bn1"),
        ([str(good), *out, "--image-root", str(tmp / "nowhere")], "--image-root"),
        ([str(good), *out, "--batch-size", "0"], "--batch-size 0: use 1 or more"),
        ([str(good), *out, "--encoder", "pixels", "--precision", "fp16"], "--precision fp16 needs CUDA"),
    ]


def test_bad_input_gives_one_line_exit_2_and_leaves_nothing(tmp_path, cli):
    for args, message in _bad_inputs(tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        result = cli("embed", *args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"left files behind: {args}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is missing")
def test_device_cuda_without_cuda_is_an_input_error(png_csv, tmp_path, cli):
    result = cli("embed", png_csv, "--out", tmp_path / "s.h5", "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda: no CUDA device is available" in result.stderr


@pytest.mark.realdata
@pytest.mark.slow
def test_real_chest_xrays_embed_one_finite_row_per_image(realcxr, tmp_path):
    result = embed(realcxr / "labels.csv", tmp_path / "real.h5", encoder="pixels", show_progress=False)
    labels = pd.read_csv(realcxr / "labels.csv")
    store = read_store(tmp_path / "real.h5")
    assert result.failed == 0 and len(store) == len(labels) >= 2500
    assert np.isfinite(store.embeddings).all()
    assert store.paths == labels["Path"].tolist()
    for column in ("PatientID", "Finding", "View"):
        expected = labels[column].astype(object).where(labels[column].notna(), np.nan)
        assert store.meta[column].equals(expected), column
    assert np.allclose(store.meta["Effusion"].to_numpy(), labels["Effusion"].to_numpy(dtype=float))
    # the same image embedded alone gives the same row (alignment check on a random row)
    model = create_encoder("pixels")
    row = 1234
    with torch.inference_mode():
        alone = model(torch.from_numpy(load_image(realcxr / store.paths[row], model.preprocessing))[None])
    assert np.allclose(store.embeddings[row], alone.numpy()[0], atol=1e-5)


@pytest.mark.parametrize(("encoder", "options"), [("pixels", {}), ("resnet18", {"weights": "none", "image_size": 32})])
def test_onnx_runtime_matches_torch(png_csv, tmp_path, encoder, options):
    torch_store = embed(png_csv, tmp_path / "t.h5", encoder=encoder, runtime="torch", show_progress=False, **options)
    onnx_store = embed(png_csv, tmp_path / "o.h5", encoder=encoder, runtime="onnx", show_progress=False, **options)
    a, b = read_store(torch_store.store), read_store(onnx_store.store)
    assert a.paths == b.paths and np.allclose(a.embeddings, b.embeddings, atol=1e-4)
    assert a.attrs["weights_sha256"] == b.attrs["weights_sha256"], "same encoder identity"
    assert not (tmp_path / "o.h5.partial").exists()


def test_the_onnx_encoder_sleeps_while_the_decoders_work():
    """Its idle threads would spin on the cores the decode workers need between its batches."""
    from xsel.encoders import model_identity
    from xsel.train.inference import cached_onnx_encoder

    model = create_encoder("pixels")
    encode = cached_onnx_encoder(model, model_identity("pixels", model), "cpu")  # exported, then from the cache
    again = cached_onnx_encoder(model, model_identity("pixels", model), "cpu")
    again(np.zeros((4, *again.sessions[0].get_inputs()[0].shape[1:]), np.float32))  # opens the replicas
    for made in (*encode.sessions, *again.sessions):
        assert made.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("cores", [1, 3, 8])
def test_onnx_replicas_share_the_cores_and_encode_a_batch_as_one_session(monkeypatch, cores):
    from xsel.encoders import model_identity
    from xsel.train.inference import cached_onnx_encoder

    model = create_encoder("resnet18", image_size=32)
    identity = model_identity("resnet18", model)
    single = cached_onnx_encoder(model, identity, "cpu").sessions[0]
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    encode = cached_onnx_encoder(model, identity, "cpu")
    assert len(encode.sessions) == 1  # the replicas open at the first batch
    replicas = min(cores, 4)
    pixels = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    for batch in (pixels, pixels[:2], pixels[:1]):  # fewer images than replicas too
        whole = single.run(["embeddings"], {"images": batch})[0]
        np.testing.assert_allclose(encode(batch), whole, rtol=1e-5, atol=1e-5)
    assert len(encode.sessions) == replicas
    assert {s.get_session_options().intra_op_num_threads for s in encode.sessions} == {cores // replicas}


def test_the_micro_batch_tuner_tries_each_run_size_then_keeps_the_fastest_per_image():
    from xsel.bundle import MicroBatchTuner

    tuner, cost, tried = MicroBatchTuner(), {1: 3.0, 4: 1.0, None: 2.0}, []
    warm_up = tuner.size()
    tuner.record(warm_up, 100.0, 8)  # the first batch is slow and not counted
    for size in MicroBatchTuner.CANDIDATES:  # nor is each size's first batch
        assert tuner.size() == size
        tuner.record(size, 100.0 if size == 4 else 1.0, 8)
    while not tuner.settled:
        size = tuner.size()
        tried.append(size)
        images = 8 if len(tried) % 2 else 5  # the rate is per image: batches differ in size
        tuner.record(size, cost[size] * images, images)
    assert sorted(tried, key=str) == sorted(list(MicroBatchTuner.CANDIDATES) * MicroBatchTuner.TUNING_ROUNDS, key=str)
    assert tuner.chosen == 4 and tuner.size() == 4
    tuner.record(4, 1000.0, 1)  # settled: later batches change nothing
    assert tuner.size() == 4


def test_onnx_replicas_encode_alike_while_and_after_tuning_the_run_size(monkeypatch):
    from xsel.bundle import MicroBatchTuner
    from xsel.encoders import model_identity
    from xsel.train.inference import cached_onnx_encoder

    model = create_encoder("resnet18", image_size=32)
    identity = model_identity("resnet18", model)
    single = cached_onnx_encoder(model, identity, "cpu").sessions[0]
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    encode = cached_onnx_encoder(model, identity, "cpu")
    rng = np.random.default_rng(1)
    batches = 1 + (1 + MicroBatchTuner.TUNING_ROUNDS) * len(MicroBatchTuner.CANDIDATES) + 2
    for _ in range(batches):
        pixels = rng.standard_normal((11, 3, 32, 32)).astype(np.float32)
        whole = single.run(["embeddings"], {"images": pixels})[0]
        np.testing.assert_allclose(encode(pixels), whole, rtol=1e-5, atol=1e-5)
    assert encode.tuner.settled and encode.tuner.chosen in MicroBatchTuner.CANDIDATES


def test_onnx_runtime_refuses_bf16(png_csv, tmp_path, cli):
    result = cli("embed", png_csv, "--out", tmp_path / "s.h5", "--runtime", "onnx", "--precision", "bf16", "-q")
    assert result.exit_code == 2 and "--runtime onnx runs locally in fp32" in result.stderr
