"""The PyTorch side of ``xsel embed``: build the encoder, decode in DataLoader workers, run batches.

``xsel.embed`` owns the job (the image table, crash-safe shards, resume, the store) and calls :func:`encoder_runner`
and :func:`embed_rows_local` here; the Ray engine reuses :func:`run_encoder`, classifier fine-tuning reuses
:func:`collate_decoded`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from xsel.bundle import make_session
from xsel.errors import XselError
from xsel.io.images import decode_or_error
from xsel.progress import progress_bar
from xsel.train.export import export_encoder


class ImageDataset:
    """Decodes and preprocesses images in DataLoader workers; failures travel as messages, not exceptions."""

    def __init__(self, files: list[Path], rows: list[int], preprocessing: dict):
        self.files, self.rows, self.preprocessing = files, rows, preprocessing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        row = self.rows[position]
        return (row, *decode_or_error(self.files[row], self.preprocessing))


def collate_decoded(items):
    """(row, array | None, error | None) items → (rows, stacked batch of the decoded ones, failures)."""
    good = [(row, array) for row, array, error in items if error is None]
    rows = np.asarray([row for row, _ in good], dtype=np.int64)
    batch = torch.from_numpy(np.stack([array for _, array in good])) if good else None
    errors = [(row, error) for row, _, error in items if error is not None]
    return rows, batch, errors


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


def onnx_forward(model, folder: Path, device: str):
    """``batch → embeddings`` with the encoder exported into ``folder`` and run by onnxruntime (after a parity
    check against PyTorch)."""
    path = folder / "encoder.onnx"
    export_encoder(model, path, device=device)
    session = make_session(path, device)
    return lambda batch: session.run(["embeddings"], {"images": batch.numpy()})[0]


def embed_rows_local(forward, preprocessing, files, todo_rows, writer, batch_size, workers, device, show_progress):
    """Decode in DataLoader worker processes, run ``forward`` here, hand results to the shard writer."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)  # decoding is the bottleneck once the model is fast
    loader = DataLoader(
        ImageDataset(files, todo_rows, preprocessing),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
    )
    with progress_bar("Embedding", total=len(todo_rows), show=show_progress) as advance:
        for rows, batch, errors in loader:
            output = forward(batch) if batch is not None else None
            advance(writer.add(rows, output, errors))
