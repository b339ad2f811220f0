"""Choosing where torch runs: ``auto`` takes CUDA when present, ``cuda`` insists on it."""

from __future__ import annotations

import torch

from xsel.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str):
    """Map ``auto|cpu|cuda`` to a ``torch.device``; asking for CUDA without one is an input error."""
    if device not in DEVICES:
        raise InputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device):
    """The autocast dtype for a precision: ``auto`` is fp16 AMP on CUDA and exact fp32 on CPU."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs CUDA; on a CPU use bf16 (or fp32)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def one_cycle(optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3):
    """torch's OneCycle schedule, except that a warm-up ending exactly one step in — which torch divides by zero on
    (10 steps at the default 0.1 warm-up) — becomes half a step."""
    if abs(pct_start * total_steps - 1.0) < 1e-9:
        pct_start = 0.5 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)
