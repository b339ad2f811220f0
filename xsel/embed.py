"""``xsel embed`` as a library call: images listed in a CSV → an HDF5 embedding store.

Crash safety: finished rows are saved every few seconds of work (``flush_seconds``; at most ``chunk_rows`` rows at a
time) as a small ``.npz`` shard (temporary file + rename) in ``<store>.partial/``. A shard covers consecutive rows,
each one embedded or failed, and is named by its first and last row; ``job.json`` records the run's settings and
the shard format. A process killed at any moment (SIGKILL included) leaves only whole shards, so ``resume=True``
embeds exactly the rows no shard covers, after reading every shard back (a damaged one is removed, with a notice,
and its rows are embedded again). The store is assembled from the shards at the end and appears in one rename.
Before any work the output is checked and locked (:func:`xsel.io.outputs.claim_output`): a second run writing
the same store is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import __version__
from xsel.errors import InputError, XselError
from xsel.identity import describe_identity, identity_of
from xsel.io.atomic import write_text_atomic
from xsel.io.decoding import check_decoding
from xsel.io.outputs import claim_output, writing
from xsel.io.table import PATH_COLUMN, read_image_table, write_errors_csv
from xsel.progress import notify
from xsel.resume import resumed_settings
from xsel.store import errors_path, read_store, write_store

JOB_FILE = "job.json"
SHARD_FORMAT = 2  # 1 (xsel 0.1): fixed blocks of chunk_rows named by their first row; such a partial run starts again
SHARD_NAME = re.compile(r"rows-(\d{10})-(\d{10})\.npz")


@dataclass(frozen=True)
class EmbedResult:
    """What one embedding run did; ``resumed_rows`` were taken from an earlier interrupted run."""

    store: Path
    rows: int
    embedded: int
    failed: int
    resumed_rows: int
    seconds: float
    device: str
    encoder: str
    embedding_dim: int
    errors_csv: Path | None
    runtime: str = "torch"  # what ran the encoder: torch or onnx (onnxruntime); none when nothing was embedded

    @property
    def images_per_second(self) -> float:
        done = self.rows - self.resumed_rows
        return done / self.seconds if self.seconds > 0 else float("nan")


def _shard_path(partial: Path, first: int, last: int) -> Path:
    return partial / f"rows-{first:010d}-{last:010d}.npz"


def _write_shard(partial: Path, first: int, rows, embeddings, error_rows, error_messages) -> None:
    last = max([*rows[-1:], *error_rows[-1:]])
    target = _shard_path(partial, first, last)
    temporary = target.with_suffix(".tmp")
    with writing(target, needed=np.asarray(embeddings).nbytes):
        try:
            with open(temporary, "wb") as handle:
                np.savez(
                    handle,
                    rows=np.asarray(rows, dtype=np.int64),
                    embeddings=np.asarray(embeddings, dtype=np.float32),
                    error_rows=np.asarray(error_rows, dtype=np.int64),
                    error_messages=np.asarray(error_messages, dtype=str),
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


SHARD_FIELDS = ("rows", "embeddings", "error_rows", "error_messages")


def _read_shard(path: Path, fields: tuple[str, ...] = SHARD_FIELDS):
    """The named arrays of a shard; an ``.npz`` member is read only when asked for."""
    with np.load(path, allow_pickle=False) as shard:
        return tuple(shard[field] for field in fields)


def _list_shards(partial: Path) -> list[tuple[int, int, Path]]:
    """(first row, last row, file) of every shard, in row order."""
    found = (SHARD_NAME.fullmatch(path.name) for path in partial.glob("rows-*.npz"))
    return sorted((int(match[1]), int(match[2]), partial / match[0]) for match in found if match)


def _verified_shards(partial: Path, embedding_dim: int, total: int) -> list[tuple[int, int, Path]]:
    """The shards of an interrupted run that read back whole and consistent; a damaged one (truncated by a full
    disk, overwritten, …) is removed with a notice, so its rows are embedded again."""
    kept, covered = [], np.zeros(total, dtype=bool)
    for first, last, path in _list_shards(partial):
        try:
            rows, embeddings, error_rows, _ = _read_shard(path)
            problem = None
            if last >= total or covered[first : last + 1].any():
                problem = "rows outside the CSV or in another shard"
            elif not np.array_equal(np.sort(np.concatenate([rows, error_rows])), np.arange(first, last + 1)):
                problem = "its rows do not match its name"
            elif embeddings.shape != (len(rows), embedding_dim):
                problem = f"embeddings of shape {embeddings.shape}, expected ({len(rows)}, {embedding_dim})"
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:  # truncated or corrupt file
            problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            notify(f"{path.name} in {partial} is damaged ({problem}); embedding its rows {first}–{last} again")
            path.unlink(missing_ok=True)
            continue
        covered[first : last + 1] = True
        kept.append((first, last, path))
    return kept


def _prepare_partial(partial: Path, job: dict, resume: bool, embedding_dim: int) -> list[tuple[int, int, Path]]:
    """The verified shards of an interrupted run of this job. A partial run of another job is refused; one of an
    older shard format, or any without ``resume``, is discarded."""
    job_file = partial / JOB_FILE
    if partial.is_dir() and resume and job_file.is_file():
        try:
            saved = json.loads(job_file.read_text())
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict) and saved.get("shard_format") == SHARD_FORMAT:
            # torch and onnx run the same fp32 encoder, checked against each other: a run may switch (precision may not)
            resumed_settings(
                saved,
                job,
                where=partial,
                may_change=("runtime",),
                hint="rerun with the same settings, or with --overwrite to start again",
            )
            return _verified_shards(partial, embedding_dim, job["rows"])
        notify(f"{partial} was left by an older xsel or its {JOB_FILE} is unreadable; embedding every image again")
    shutil.rmtree(partial, ignore_errors=True)
    with writing(partial):
        partial.mkdir(parents=True)
        write_text_atomic(json.dumps(job, sort_keys=True), job_file)
    return []


def embed(
    csv: str | Path,
    out: str | Path,
    *,
    encoder: str = "resnet18",
    weights: str | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    image_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    chunk_rows: int = 1024,
    flush_seconds: float = 5.0,
    engine: str = "local",
    runtime: str = "auto",
    address: str | None = None,
    num_gpus_per_worker: float = 0.0,
    concurrency: int | None = None,
    show_progress: bool = True,
) -> EmbedResult:
    """Embed every image of ``csv`` with the named encoder plugin into the store ``out``.

    Undecodable images are skipped and listed in ``<out>.errors.csv``; at least one image must embed.
    ``precision``: ``auto`` = fp16 autocast on CUDA, exact fp32 on CPU; ``bf16`` roughly doubles CPU
    throughput on processors with AVX-512 BF16/AMX at a relative error of about 3e-3.
    ``runtime="onnx"`` runs the encoder exported to ONNX (checked against PyTorch, cached per encoder identity) with
    onnxruntime, fp32 only — 1.4–2.8× PyTorch fp32 on the CPUs measured here; ``auto`` does so whenever it can
    (onnxruntime installed, fp32, local engine, export and check passed), else runs PyTorch; the result says
    which ran. ``engine="ray"`` runs decoding and the encoder on a Ray cluster (``address``; a local one when
    None), writing the same shards and store as the local engine. Progress is saved every ``flush_seconds`` of work
    (and every ``chunk_rows`` rows), which bounds what a kill can lose.
    """
    out = Path(out)
    check_decoding(batch_size, workers)  # before any output exists
    if engine not in ("local", "ray"):
        raise InputError(f"--engine {engine}: choose local or ray")
    if runtime not in ("auto", "torch", "onnx"):
        raise InputError(f"--runtime {runtime}: choose auto, torch or onnx")
    if runtime == "onnx" and (engine != "local" or precision not in ("auto", "fp32")):
        raise InputError("--runtime onnx runs locally in fp32: leave out --engine ray and --precision")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows}: use 1 or more")
    if out.exists() and not overwrite and not resume:
        raise InputError(f"{out} already exists; pass --overwrite to replace it or --resume to finish it")
    table = read_image_table(csv, image_root, show_progress=show_progress)
    inputs = [table.csv_path] if table.csv_path.is_file() else []  # a scanned folder may hold its store
    with claim_output(out, kind="store", inputs=inputs, overwrite=overwrite or resume):
        return _embed_claimed(
            table,
            out,
            encoder=encoder,
            weights=weights,
            batch_size=batch_size,
            workers=workers,
            device=device,
            precision=precision,
            image_size=image_size,
            resume=resume and not overwrite,
            chunk_rows=chunk_rows,
            flush_seconds=flush_seconds,
            engine=engine,
            runtime=runtime,
            address=address,
            num_gpus_per_worker=num_gpus_per_worker,
            concurrency=concurrency,
            show_progress=show_progress,
        )


def _embed_claimed(table, out: Path, *, encoder, weights, image_size, resume, engine, runtime, **run) -> EmbedResult:
    """:func:`embed` once the output is checked and locked: build the encoder, embed the rows no shard covers,
    assemble the store."""
    if engine == "ray":
        from xsel.train.ray_engine import import_ray

        import_ray()  # fail before anything is written
    from xsel.encoders import create_encoder, model_identity
    from xsel.train import inference
    from xsel.train.runtime import autocast_dtype, resolve_device

    device, precision = run["device"], run["precision"]
    torch_device = resolve_device(device if engine == "local" else "cpu")  # Ray workers resolve their own
    amp_dtype = autocast_dtype(precision, torch_device)
    model = create_encoder(encoder, weights, image_size=image_size)
    identity = model_identity(encoder, model)
    dim = int(model.embedding_dim)
    partial = out.with_name(out.name + ".partial")
    chosen = inference.pick_runtime(runtime, engine=engine, device=torch_device, amp_dtype=amp_dtype)
    if chosen == "onnx":
        amp_dtype = None  # onnxruntime runs fp32, also where --precision auto means fp16 for PyTorch (CUDA)
    job = {
        **identity,
        "source_csv_sha256": table.source_sha256,
        "rows": len(table.files),
        "precision": str(amp_dtype or "float32").removeprefix("torch."),
        "runtime": chosen,
        "shard_format": SHARD_FORMAT,
    }
    if resume and out.exists() and not partial.exists():
        return _already_complete(out, table, job)
    forward = None
    if engine == "local":  # before the job is saved: auto may fall back to torch
        forward, job["runtime"] = inference.local_forward(
            model, identity, job["runtime"], requested=runtime, device=torch_device, amp_dtype=amp_dtype
        )
    done = _prepare_partial(partial, job, resume, dim)
    covered = np.zeros(len(table.files), dtype=bool)
    for first, last, _ in done:
        covered[first : last + 1] = True
    todo_rows = np.flatnonzero(~covered).tolist()
    resumed_rows = len(table.files) - len(todo_rows)

    began = time.perf_counter()
    if todo_rows:
        writer = ShardWriter(partial, dim, chunk_rows=run["chunk_rows"], flush_seconds=run["flush_seconds"])
        if engine == "ray":
            from xsel.train.ray_engine import embed_rows_ray

            spec = {
                "encoder": encoder,
                "weights": weights,
                "image_size": image_size,
                "precision": precision,
                "device": device,  # resolved on each worker: CUDA is theirs to have, not the driver's
            }
            embed_rows_ray(
                spec,
                model.preprocessing,
                table.files,
                todo_rows,
                writer,
                batch_size=run["batch_size"],
                address=run["address"],
                num_gpus_per_worker=run["num_gpus_per_worker"],
                concurrency=run["concurrency"],
                show_progress=run["show_progress"],
            )
        else:
            inference.embed_rows_local(
                forward,
                model.preprocessing,
                table.files,
                todo_rows,
                writer,
                run["batch_size"],
                run["workers"],
                torch_device,
                run["show_progress"],
            )
        writer.flush()
    seconds = time.perf_counter() - began

    shards = _list_shards(partial)
    if sum(last - first + 1 for first, last, _ in shards) != len(table.files):
        raise XselError(f"{partial}: the shards do not cover every row of {table.csv_path}; rerun with --resume")
    result_rows, error_rows, error_messages = [], [], []
    for _, _, path in shards:
        rows, bad_rows, messages = _read_shard(path, ("rows", "error_rows", "error_messages"))  # not embeddings
        result_rows.append(rows)
        error_rows.extend(bad_rows.tolist())
        error_messages.extend(messages.tolist())
    kept = np.concatenate(result_rows) if result_rows else np.zeros(0, dtype=np.int64)
    if len(kept) == 0:
        shutil.rmtree(partial, ignore_errors=True)
        first = f" (first: {table.paths[error_rows[0]]}: {error_messages[0]})" if error_rows else ""
        raise InputError(f"{table.csv_path}: none of the {len(table.files)} images could be read{first}")

    attrs = {
        **identity,
        "xsel_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "encoder_options": {
            "weights": weights if weights is not None else "default",
            "image_size": image_size,
            "precision": job["precision"],
        },
        "source_csv_sha256": job["source_csv_sha256"],
    }
    meta = table.frame.drop(columns=[PATH_COLUMN]).iloc[kept].reset_index(drop=True)
    write_store(
        out,
        embedding_chunks=(_read_shard(path, ("embeddings",))[0] for _, _, path in shards),
        paths=[table.paths[row] for row in kept],
        meta=meta,
        attrs=attrs,
    )
    errors_csv = write_errors_csv(errors_path(out), [table.paths[row] for row in error_rows], error_messages)
    shutil.rmtree(partial, ignore_errors=True)
    return EmbedResult(
        store=out,
        rows=len(table.files),
        embedded=len(kept),
        failed=len(error_rows),
        resumed_rows=resumed_rows,
        seconds=seconds,
        device=f"ray ({run['address'] or 'local cluster'})" if engine == "ray" else str(torch_device),
        encoder=identity["encoder"],
        embedding_dim=dim,
        errors_csv=errors_csv,
        runtime=job["runtime"],
    )


def _already_complete(out: Path, table, job: dict) -> EmbedResult:
    """A finished store, when it is the one this run would make: same encoder identity, same CSV, every row
    accounted for; anything else is refused, naming the difference."""
    store = read_store(out)
    errors_csv = errors_path(out)
    failed = len(pd.read_csv(errors_csv)) if errors_csv.is_file() else 0
    differences = []
    if identity_of(store.attrs) != identity_of(job):
        differences.append(
            f"it was made by {describe_identity(identity_of(store.attrs))}, this run encodes with "
            f"{describe_identity(identity_of(job))}"
        )
    if store.attrs.get("source_csv_sha256") != job["source_csv_sha256"]:
        differences.append(f"{table.csv_path} has changed since (SHA-256 differs)")
    if len(store) + failed != job["rows"]:
        differences.append(f"it accounts for {len(store) + failed} images, the CSV lists {job['rows']}")
    if differences:
        raise InputError(
            f"{out} is complete but not this run's: {'; '.join(differences)}; pass --overwrite to embed again"
        )
    return EmbedResult(
        store=out,
        rows=len(store) + failed,
        embedded=len(store),
        failed=failed,
        resumed_rows=len(store) + failed,
        seconds=0.0,
        device="none",
        encoder=str(store.attrs.get("encoder")),
        embedding_dim=int(store.embeddings.shape[1]),
        errors_csv=errors_csv if failed else None,
        runtime="none",
    )


class ShardWriter:
    """Takes results in row order, from either engine, and saves them as shards of consecutive rows: after
    ``flush_seconds`` of work, at ``chunk_rows`` rows, and before a row that does not follow the last one (a
    resumed run skips the rows saved before)."""

    def __init__(self, partial: Path, embedding_dim: int, *, chunk_rows: int = 1024, flush_seconds: float = 5.0):
        self.partial, self.dim, self.chunk_rows, self.flush_seconds = partial, embedding_dim, chunk_rows, flush_seconds
        self._start()

    def _start(self) -> None:
        self.first, self.next_row, self.since = None, None, time.monotonic()
        self.rows, self.embeddings, self.error_rows, self.errors = [], [], [], []

    def add(self, rows: np.ndarray, embeddings: np.ndarray | None, errors: list[tuple[int, str]]) -> int:
        """Add a batch (rows embedded, their embeddings, and (row, message) failures); returns its size."""
        error_map = dict(errors)
        position = {row: i for i, row in enumerate(np.asarray(rows).tolist())}
        ordered = sorted([*position, *error_map])
        for row in ordered:
            if self.first is not None and row != self.next_row:
                self.flush()
            if self.first is None:
                self.first = row
            self.next_row = row + 1
            if row in error_map:
                self.error_rows.append(row)
                self.errors.append(error_map[row])
            else:
                self.rows.append(row)
                self.embeddings.append(embeddings[position[row] : position[row] + 1])
            if self.next_row - self.first >= self.chunk_rows:
                self.flush()
        if time.monotonic() - self.since >= self.flush_seconds:
            self.flush()
        return len(ordered)

    def flush(self) -> None:
        """Save what has been added since the last shard, if anything."""
        if self.first is None:
            return
        embeddings = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, self.dim), np.float32)
        _write_shard(self.partial, self.first, self.rows, embeddings, self.error_rows, self.errors)
        self._start()
