"""Writing and reading xsel's own checkpoints (``selector.pt``, ``classifier.pt``, ``last.pt``) safely and alike,
and the trust gate (:mod:`xsel.trust`) any learned selector's checkpoint may carry."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from xsel.errors import InputError
from xsel.io.atomic import write_atomic
from xsel.trust import TrustGate


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


def gate_payload(gate: TrustGate | None) -> dict:
    """What a checkpoint stores for a learned selector's trust gate: ``trust_gate`` (its JSON-able record) and
    ``trust_reference`` (the reference rows as a tensor), both loadable with ``weights_only=True``; {} for no gate."""
    if gate is None:
        return {}
    return {"trust_gate": gate.to_record(), "trust_reference": torch.from_numpy(np.array(gate.reference))}


def gate_from_payload(payload: dict) -> TrustGate | None:
    """The trust gate a checkpoint carries, or None (checkpoints from before the gate have none)."""
    record = payload.get("trust_gate")
    if record is None:
        return None
    reference = payload.get("trust_reference")
    where = payload.get("path", "the checkpoint")
    if not isinstance(reference, torch.Tensor):
        raise InputError(f"{where}: its trust gate has no reference tensor; retrain or drop the gate")
    try:
        return TrustGate.from_record(record, reference.detach().cpu().numpy())
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
