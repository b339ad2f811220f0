"""``xsel embed --engine ray``: decode images in Ray CPU tasks, encode them in an actor pool.

Design: results are **streamed to the driver in row order** (Ray Data with ``preserve_order``) and
written by the same :class:`xsel.embed.ShardWriter` as the local engine, rather than written as parts
by the workers and merged later. The driver then needs no shared file system with the cluster, the
shards, ``--resume``, the errors file and the store are byte-for-byte the local engine's, and the
driver's work (a few KB per image) is small next to decoding and the encoder. Ray's streaming executor
applies backpressure, so memory stays bounded however many images there are.

Each actor builds the encoder once (``create_encoder`` with the run's settings), on a GPU when the
cluster gives it one (``num_gpus_per_worker``). The workers must see the same Python environment and
image paths as the driver (a shared file system or ``runtime_env``), as for any Ray job.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from xsel.encoders import create_encoder
from xsel.errors import InputError
from xsel.io.images import decode_or_error
from xsel.progress import progress_bar
from xsel.train.inference import run_encoder
from xsel.train.runtime import autocast_dtype, resolve_device


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'xsel[ray]'") from None
    return ray


def decode_batch(batch: dict, preprocessing: dict) -> dict:
    """A Ray CPU task: decode and preprocess a batch of paths; failures become messages, not exceptions."""
    size, channels = int(preprocessing["image_size"]), int(preprocessing["channels"])
    images = np.zeros((len(batch["path"]), channels, size, size), dtype=np.float32)
    errors = np.full(len(batch["path"]), "", dtype=object)
    for i, path in enumerate(batch["path"]):
        image, error = decode_or_error(str(path), preprocessing)
        if error is None:
            images[i] = image
        else:
            errors[i] = error
    return {"row": batch["row"], "image": images, "error": errors}


class EncoderActor:
    """One encoder per actor, built once; runs it on the rows that decoded."""

    def __init__(self, spec: dict):
        self.device = resolve_device(spec["device"])
        self.amp_dtype = autocast_dtype(spec["precision"], self.device)
        self.model = create_encoder(spec["encoder"], spec["weights"], image_size=spec["image_size"])
        self.model = self.model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([error == "" for error in batch["error"]], dtype=bool)
        embeddings = np.zeros((len(ok), self.model.embedding_dim), dtype=np.float32)
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            embeddings[ok] = run_encoder(self.model, images, self.device, self.amp_dtype)
        return {"row": batch["row"], "embedding": embeddings, "error": batch["error"]}


def embed_rows_ray(
    spec: dict,
    preprocessing: dict,
    files,
    todo_rows: list[int],
    writer,
    *,
    batch_size: int = 32,
    address: str | None = None,
    num_gpus_per_worker: float = 0.0,
    concurrency: int | None = None,
    show_progress: bool = True,
) -> None:
    """Embed ``todo_rows`` on Ray and hand each batch, in row order, to ``writer``."""
    ray = import_ray()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the driver shows its own progress bar
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    items = [{"row": row, "path": str(files[row])} for row in todo_rows]
    if concurrency is None:  # one actor per GPU share when GPUs are asked for, else one
        gpus = ray.available_resources().get("GPU", 0)
        concurrency = max(1, int(gpus // num_gpus_per_worker)) if num_gpus_per_worker else 1
    dataset = (
        ray.data.from_items(items)
        .map_batches(
            decode_batch, fn_kwargs={"preprocessing": preprocessing}, batch_size=batch_size, batch_format="numpy"
        )
        .map_batches(
            EncoderActor,
            fn_constructor_kwargs={"spec": spec},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=num_gpus_per_worker,
        )
    )
    with progress_bar("Embedding (ray)", total=len(todo_rows), show=show_progress) as advance:
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            rows = np.asarray(batch["row"], dtype=np.int64)
            failed = np.asarray([error != "" for error in batch["error"]], dtype=bool)
            errors = [
                (int(row), str(message)) for row, message in zip(rows[failed], batch["error"][failed], strict=True)
            ]
            advance(writer.add(rows[~failed], np.asarray(batch["embedding"])[~failed], errors))
