"""Writing and reading xsel's own checkpoints (``selector.pt``, ``classifier.pt``, ``last.pt``) safely and alike."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from xsel.errors import InputError
from xsel.io.atomic import write_atomic


def read_checkpoint(path: str | Path, *, file_format: str, kind: str, made_by: str, default_name: str | None = None):
    """Load a checkpoint with ``weights_only=True`` onto the CPU; return ``(path, payload)``.

    A folder stands for its ``default_name`` file. A missing, unreadable or foreign file (its ``format``
    entry is not ``file_format``) is a one-line InputError that names the command making the right one.
    """
    path = Path(path)
    if default_name is not None and path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise InputError(f"{path}: {kind} checkpoint not found; make one with `{made_by}`")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them: the error says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a readable {kind} checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise InputError(f"{path}: not an xsel {kind} checkpoint; pass one written by `{made_by}`")
    return path, payload


def save_torch_atomic(payload, path: str | Path) -> Path:
    """``torch.save`` through :func:`xsel.io.atomic.write_atomic`: no reader ever sees a partial checkpoint."""
    return write_atomic(path, lambda temporary: torch.save(payload, temporary))
