"""The PyTorch side of ``xsel embed``: pick the runtime, build the forward pass, run it over decoded batches.

``xsel.embed`` owns the job (the image table, crash-safe shards, resume, the store) and calls :func:`pick_runtime`,
:func:`local_forward` and :func:`embed_rows_local` here; the Ray engine reuses :func:`run_encoder`.

The onnxruntime encoder is exported and checked against PyTorch once per encoder identity and kept in a user cache
folder (:func:`encoder_cache_dir`); a cached file is used only when its SHA-256, identity, xsel version and device
match the record written beside it, else it is exported again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from xsel import __version__
from xsel.bundle import EncoderReplicas, make_session
from xsel.errors import InputError, XselError
from xsel.io.atomic import write_atomic, write_text_atomic
from xsel.io.decoding import BatchDecoder
from xsel.io.table import file_sha256
from xsel.progress import notify, progress_bar

RUNTIMES = ("auto", "torch", "onnx")
CACHE_MODEL, CACHE_RECORD = "encoder.onnx", "encoder.json"


def run_encoder(model, batch, device, amp_dtype) -> np.ndarray:
    """One forward pass in inference mode (channels-last, autocast when asked), checked for shape."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        output = model(batch).float().cpu().numpy()
    if output.shape != (len(batch), model.embedding_dim):
        raise XselError(f"encoder returned shape {output.shape}, expected {(len(batch), model.embedding_dim)}")
    return output


def torch_forward(model, device, amp_dtype):
    """``batch → embeddings`` with PyTorch on ``device``."""
    model = model.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    return lambda batch: run_encoder(model, batch, device, amp_dtype)


def pick_runtime(runtime: str, *, engine: str, device, amp_dtype) -> str:
    """``torch`` or ``onnx`` for a requested ``auto|torch|onnx``: ``auto`` takes onnxruntime for fp32 on the local
    engine when it is installed (with its CUDA provider when the encoder runs on CUDA), and says why when it
    cannot."""
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    try:
        import onnxruntime
    except ImportError:
        return "torch"  # the summary line says which runtime ran; pip install 'xsel[cpu]' adds onnxruntime
    reason = None
    if engine != "local":
        reason = f"--engine {engine} runs the encoder with PyTorch on its workers"
    elif amp_dtype is not None:
        reason = f"{str(amp_dtype).removeprefix('torch.')} precision runs with PyTorch (onnxruntime runs fp32 here)"
    elif device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        reason = "onnxruntime has no CUDA provider here (pip install 'xsel[gpu]'), so PyTorch runs on CUDA"
    if reason:
        notify(f"--runtime auto: {reason}")
        return "torch"
    return "onnx"


def local_forward(model, identity: dict, runtime: str, *, requested: str, device, amp_dtype):
    """(``batch → embeddings``, the runtime that runs it). With ``auto``, an encoder that fails to export or to
    match PyTorch runs with PyTorch instead, after a notice; with ``onnx`` that is an error."""
    if runtime == "onnx":
        try:
            encode = cached_onnx_encoder(model, identity, device.type)
        except Exception as error:  # a plugin's encoder may fail the export in any way; auto falls back on all
            if requested != "auto":
                raise
            notify(f"--runtime auto: the ONNX encoder is not usable ({error}); running PyTorch")
        else:
            return (lambda batch: encode(batch.numpy())), "onnx"
    return torch_forward(model, device, amp_dtype), "torch"


def encoder_cache_dir(identity: dict) -> Path:
    """Where the exported encoder of this identity is kept: ``$XSEL_CACHE_DIR`` (else ``~/.cache/xsel``)
    ``/encoders/<hash of the identity>``."""
    root = Path(os.environ.get("XSEL_CACHE_DIR") or Path.home() / ".cache" / "xsel")
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return root / "encoders" / key


def _cache_problem(folder: Path, identity: dict, device: str) -> str | None:
    """Why the cached encoder in ``folder`` cannot be trusted, or None when it can."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text())
    except (OSError, ValueError) as error:
        return f"its record is unreadable ({type(error).__name__})"
    if not isinstance(record, dict):
        return "its record is not a JSON object"
    from xsel.train.export import OPSET  # onnx loads on the onnx path only

    expected = {"identity": identity, "xsel_version": __version__, "opset": OPSET, "device": device}
    for key, value in expected.items():
        if record.get(key) != value:
            return f"it was made for another {key}"
    try:
        if file_sha256(folder / CACHE_MODEL) != record.get("sha256"):
            return f"{CACHE_MODEL} does not match its SHA-256"
    except OSError:
        return f"{CACHE_MODEL} is missing"
    return None


def cached_onnx_encoder(model, identity: dict, device: str) -> EncoderReplicas:
    """``model``'s encoder on onnxruntime from the cache, exporting it (with its parity check) when the cache has no
    trusted copy. Writers use a temporary file and a rename, so concurrent runs never see a partial file; a record
    that does not match its file is never trusted. Its sessions alternate with decoding, so they do not spin."""
    from xsel.train.export import ATOL, OPSET, RTOL, export_encoder  # onnx loads on the onnx path only

    folder = encoder_cache_dir(identity)
    problem = _cache_problem(folder, identity, device)
    if problem is None:
        return _replicas(folder / CACHE_MODEL, device)
    if folder.exists():
        notify(f"the cached ONNX encoder in {folder} is not used ({problem}); exporting it again")
    made = {}

    def export(temporary: Path) -> None:
        made["checks"] = export_encoder(model, temporary, device=device)  # its notices are silenced there
        made["encode"] = _replicas(temporary, device)  # this run's checked bytes
        made["sha256"] = file_sha256(temporary)

    write_atomic(folder / CACHE_MODEL, export)
    record = {
        "identity": identity,
        "sha256": made["sha256"],
        "xsel_version": __version__,
        "opset": OPSET,
        "device": device,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parity": {"tolerance": {"rtol": RTOL, "atol": ATOL}, "encoder": made["checks"], "passed": True},
    }
    write_text_atomic(json.dumps(record, indent=2), folder / CACHE_RECORD)
    return made["encode"]


def _replicas(path: Path, device: str) -> EncoderReplicas:
    model = path.read_bytes()  # once: replicas opened later run these bytes, even after the file is renamed
    opened = lambda threads: make_session(model, device, spinning=False, threads=threads)  # noqa: E731
    return EncoderReplicas(opened, "images", "embeddings")


def embed_rows_local(forward, preprocessing, files, todo_rows, writer, batch_size, workers, device, show_progress):
    """Decode in worker processes (:class:`~xsel.io.decoding.BatchDecoder`: between forward passes on a CPU, beside
    them on an accelerator), run ``forward`` here, hand results to the shard writer."""
    decoder = BatchDecoder(preprocessing, batch_size, workers, overlap=device.type != "cpu")
    with decoder, progress_bar("Embedding", total=len(todo_rows), show=show_progress) as advance:
        for rows, pixels, errors in decoder.batches(files, todo_rows):
            output = forward(torch.from_numpy(pixels)) if len(rows) else None
            advance(writer.add(rows, output, errors))
