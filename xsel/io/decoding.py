"""Decoding for an encoder: worker processes fill a shared batch buffer, one batch at a time.

On a CPU the encoder's forward pass runs on every core (PyTorch's and onnxruntime's thread pools). Decoders working
beside it take a core from one of its threads, and each parallel step of the model then waits for the thread that
lost its core: on two cores EfficientNet-Lite0 (many small steps) embedded at 57% of its forward-only rate that way.
So on a CPU the workers decode a batch with every core, then the caller encodes it with every core
(``overlap=False``); on an accelerator the next batch is decoded while the current one is encoded (``overlap=True``,
two buffers). Pixels travel through a memory-mapped file in a temporary folder (RAM-backed ``/dev/shm`` where it has
room), not through pickles; only failures travel back as messages. Used by ``xsel embed`` and the site runtime.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from xsel.errors import InputError, XselError
from xsel.io.images import decode_or_error
from xsel.io.workers import die_with_parent, worker_pool

_worker: dict = {}  # in a worker process: the preprocessing and the opened buffers


def check_decoding(batch_size: int, workers: int | None) -> None:
    """Refuse a batch size or worker count the decoder cannot use, naming the option."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: use 1 or more")
    if workers is not None and workers < 0:
        raise InputError(f"--workers {workers}: use 0 (decode in this process) or more")


def _open_buffers(paths: list[str], shape: tuple[int, ...]) -> list[np.ndarray]:
    return [np.memmap(path, dtype=np.float32, mode="r+", shape=shape) for path in paths]


def _start_worker(parent: int, preprocessing: dict, paths: list[str], shape: tuple[int, ...]) -> None:
    die_with_parent(parent)
    _worker["preprocessing"], _worker["buffers"] = preprocessing, _open_buffers(paths, shape)


def _decode_into(buffer: np.ndarray, preprocessing: dict, jobs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Decode each (slot, path) into ``buffer[slot]``; returns the (slot, message) of the images that failed."""
    failed = []
    for slot, path in jobs:
        array, error = decode_or_error(path, preprocessing)
        if error is None:
            buffer[slot] = array
        else:
            failed.append((slot, error))
    return failed


def _decode_in_worker(buffer_index: int, jobs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return _decode_into(_worker["buffers"][buffer_index], _worker["preprocessing"], jobs)


SHARED_MEMORY = Path("/dev/shm")


def _reserve(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes of space actually allocated (not a sparse file), or raise OSError."""
    with open(path, "wb") as handle:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, size)
        else:  # macOS, Windows: no /dev/shm here, the temporary folder's file system backs the pages
            handle.truncate(size)


def _reserved_folder(where: Path | None, count: int, size: int) -> Path:
    """A new folder in ``where`` (None: the temporary folder) with ``count`` files of ``size`` bytes reserved, or
    OSError with nothing left behind."""
    folder = Path(tempfile.mkdtemp(prefix="xsel-decode-", dir=where))
    try:
        for index in range(count):
            _reserve(folder / f"batch{index}.f32", size)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _buffer_folder(count: int, size: int) -> Path:
    """The folder of the ``count`` buffer files (``batch0.f32``, …) of ``size`` bytes: RAM-backed /dev/shm when it
    has room — a container's is often 64 MiB, and writing past a full tmpfs kills the process (SIGBUS) instead of
    raising — else the temporary folder (the page cache keeps it in memory too)."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        try:
            return _reserved_folder(SHARED_MEMORY, count, size)
        except OSError:
            pass  # too small: the temporary folder below
    try:
        return _reserved_folder(None, count, size)
    except OSError as error:
        raise XselError(
            f"no room for {count * size / 2**20:.0f} MiB of decode buffers in {tempfile.gettempdir()} ({error}); "
            "free some space or lower --batch-size"
        ) from None


class BatchDecoder:
    """Decodes the images of ``files`` named by ``rows``, ``batch_size`` at a time, with ``workers`` processes
    (0: in this process). Use as a context manager; :meth:`batches` yields each batch's pixels."""

    def __init__(self, preprocessing: dict, batch_size: int, workers: int | None = None, *, overlap: bool = False):
        check_decoding(batch_size, workers)
        self.preprocessing, self.batch_size, self.overlap = preprocessing, batch_size, overlap
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers  # one per core: nothing else runs
        size, channels = int(preprocessing["image_size"]), int(preprocessing["channels"])
        self.shape = (batch_size, channels, size, size)
        self._folder: Path | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._buffers: list[np.ndarray] = []

    def __enter__(self) -> BatchDecoder:
        count = 2 if self.overlap else 1
        self._folder = _buffer_folder(count, int(np.prod(self.shape)) * 4)
        paths = [str(self._folder / f"batch{index}.f32") for index in range(count)]
        self._buffers = _open_buffers(paths, self.shape)
        if self.workers > 0:
            self._pool = worker_pool(self.workers, _start_worker, (os.getpid(), self.preprocessing, paths, self.shape))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._buffers = []
        shutil.rmtree(self._folder, ignore_errors=True)

    def batches(
        self, files: Sequence[str | Path], rows: Sequence[int]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """(rows decoded, their pixels ``(n, channels, size, size)``, (row, message) of the failures) per batch, in
        row order. The pixels live in a shared buffer: use them before asking for the next batch."""
        chunks = [list(rows[start : start + self.batch_size]) for start in range(0, len(rows), self.batch_size)]
        pending = self._submit(files, chunks[0], 0) if chunks else None
        for index in range(len(chunks)):
            current = pending
            following = index + 1 < len(chunks)
            if self.overlap and following:  # into the other buffer, while the caller encodes this one
                pending = self._submit(files, chunks[index + 1], (index + 1) % len(self._buffers))
            yield self._collect(*current)
            if not self.overlap and following:
                pending = self._submit(files, chunks[index + 1], 0)

    def _submit(self, files, chunk: list[int], buffer_index: int):
        jobs = [(slot, str(files[row])) for slot, row in enumerate(chunk)]
        if self._pool is None:
            done: Future = Future()
            done.set_result(_decode_into(self._buffers[buffer_index], self.preprocessing, jobs))
            return chunk, buffer_index, [done]
        pieces = np.array_split(np.arange(len(jobs)), min(len(jobs), 2 * self.workers))  # evens out slow files
        futures = [self._pool.submit(_decode_in_worker, buffer_index, [jobs[i] for i in piece]) for piece in pieces]
        return chunk, buffer_index, futures

    def _collect(self, chunk: list[int], buffer_index: int, futures: list[Future]):
        try:
            failed = dict(slot_error for future in futures for slot_error in future.result())
        except BrokenProcessPool as error:
            raise XselError(
                f"a decode worker process ended unexpectedly ({error}); --workers 0 decodes without worker processes"
            ) from None
        good = [slot for slot in range(len(chunk)) if slot not in failed]
        buffer = np.asarray(self._buffers[buffer_index])
        pixels = buffer[: len(chunk)] if len(good) == len(chunk) else buffer[good]
        rows = np.asarray([chunk[slot] for slot in good], dtype=np.int64)
        return rows, pixels, [(chunk[slot], message) for slot, message in sorted(failed.items())]
