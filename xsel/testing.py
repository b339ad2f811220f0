"""Contract checks a plugin author can run in their own tests: ``check_encoder(my_factory())``."""

from __future__ import annotations

from xsel.io.images import PREPROCESSING_KEYS


class ContractError(AssertionError):
    """A plugin object breaks the xsel plugin contract; the message lists every problem found."""


def check_encoder(encoder, *, batch_size: int = 3, seed: int = 0, atol: float = 1e-4) -> None:
    """Check an encoder against the contract; raise :class:`ContractError` listing what is wrong.

    Checks: a torch Module with an int ``embedding_dim`` and ``preprocessing`` holding image_size,
    channels (1 or 3), and one mean/std per channel (std > 0); in eval mode a seeded float32 batch
    ``(B, C, S, S)`` maps to finite float32 ``(B, embedding_dim)``, twice the same, and each row does
    not depend on the rest of the batch (no batch statistics at inference).
    """
    import torch

    problems = []
    if not isinstance(encoder, torch.nn.Module):
        raise ContractError(f"encoder is a {type(encoder).__name__}, not a torch.nn.Module")
    dim = getattr(encoder, "embedding_dim", None)
    if not isinstance(dim, int) or dim <= 0:
        problems.append(f"embedding_dim must be a positive int, got {dim!r}")
    pre = getattr(encoder, "preprocessing", None)
    if not isinstance(pre, dict):
        raise ContractError("encoder.preprocessing must be a dict with " + ", ".join(PREPROCESSING_KEYS))
    missing = [key for key in PREPROCESSING_KEYS if key not in pre]
    if missing:
        raise ContractError(f"encoder.preprocessing lacks {', '.join(missing)}")
    channels, size = pre["channels"], pre["image_size"]
    if channels not in (1, 3):
        problems.append(f"preprocessing channels must be 1 or 3, got {channels!r}")
    if not isinstance(size, int) or size < 8:
        problems.append(f"preprocessing image_size must be an int ≥ 8, got {size!r}")
    for key in ("mean", "std"):
        if len(pre[key]) != channels:
            problems.append(f"preprocessing {key} needs one value per channel ({channels}), got {pre[key]!r}")
    if any(value <= 0 for value in pre["std"]):
        problems.append(f"preprocessing std must be positive, got {pre['std']!r}")
    if problems:
        raise ContractError("; ".join(problems))

    encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, channels, size, size, generator=generator)
    with torch.inference_mode():
        first, second = encoder(batch), encoder(batch)
        single = encoder(batch[:1])
    if tuple(first.shape) != (batch_size, dim):
        problems.append(f"forward returned shape {tuple(first.shape)}, expected {(batch_size, dim)}")
    elif first.dtype != torch.float32:
        problems.append(f"forward returned {first.dtype}, expected torch.float32")
    elif not torch.isfinite(first).all():
        problems.append("forward returned NaN or infinite values")
    elif not torch.equal(first, second):
        problems.append("two forward passes in eval mode differ: the encoder is not deterministic")
    elif not torch.allclose(first[:1], single, atol=atol, rtol=1e-4):
        problems.append("a row's embedding changes with the rest of the batch (batch statistics in eval mode?)")
    if problems:
        raise ContractError("; ".join(problems))
