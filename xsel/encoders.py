"""Create encoders from the plugin registry and load weight files into them.

An encoder is a ``torch.nn.Module`` mapping a preprocessed float32 batch ``(B, C, H, W)`` to
``(B, embedding_dim)``, with attributes ``embedding_dim`` and ``preprocessing``
(``image_size``, ``channels``, ``mean``, ``std``), and optionally ``architecture``: a string a plugin changes
when its network computes differently with the same weights. Torch is imported only inside functions.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from xsel import plugins
from xsel.errors import InputError, XselError
from xsel.identity import encoder_identity
from xsel.io.images import PREPROCESSING_KEYS, check_preprocessing

NO_WEIGHTS = "none"
# Wrapper prefixes of checkpoints saved from DataParallel / MoCo (query encoder) training.
MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")
WRAPPER_PREFIXES = ("module.",)


def weights_sha256(encoder) -> str:
    """SHA-256 over the encoder's parameters and buffers (names, dtypes, shapes, bytes), after its
    ``architecture`` string where it declares one.

    Hashing what was loaded, not the file it came from, gives one identity for every way of
    naming the same weights (``none``, ``imagenet``, a plugin's default, a local file); the
    architecture keeps embeddings of a network since changed (an activation, a pooling) from
    being read as the new one's, while encoders that declare none keep the hashes they had.
    """
    import torch

    digest = hashlib.sha256()
    architecture = getattr(encoder, "architecture", None)
    if architecture is not None:
        digest.update(f"architecture|{architecture}|".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(name: str, model) -> dict:
    """The identity of a built encoder: its registered (primary) name, its weights' hash and its preprocessing."""
    return encoder_identity(plugins.get("encoder", name).name, weights_sha256(model), model.preprocessing)


def _load_tensors(path, **options):
    """``torch.load`` of tensors only (never arbitrary pickled code), without the warnings torch prints about
    legacy pickles before refusing them: callers report an unreadable file in one line."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, **options)


def weights_record(weights: str | None) -> dict | None:
    """The ``xsel`` record inside a weights file written by xsel (``encoder.pt``, ``classifier.pt``), if any:
    the encoder it was trained as and the preprocessing it was trained with."""

    if weights is None or not Path(weights).is_file():
        return None
    try:
        loaded = _load_tensors(weights, mmap=True)
    except Exception:
        return None  # not a zip checkpoint: load_weights reports what is wrong with it
    record = loaded.get("xsel") if isinstance(loaded, dict) else None
    return record if isinstance(record, dict) else None


def create_encoder(name: str, weights: str | None = None, *, image_size: int | None = None, **options):
    """Build the named encoder in eval mode; ``image_size`` overrides its preprocessing size.

    ``weights=None`` leaves the plugin's default; ``"none"`` asks for its seeded random init. A weights file
    written by xsel brings its preprocessing (an encoder pretrained at 96 px is run at 96 px) and must
    have been trained as the same encoder.
    """
    entry = plugins.get("encoder", name)
    record = weights_record(weights)
    if record is not None:
        trained_as = record.get("encoder")
        if trained_as is not None and plugins.get("encoder", trained_as).name != entry.name:
            raise InputError(
                f"--weights {weights} was trained as encoder {trained_as!r}, not {entry.name!r}; "
                f"pass --encoder {trained_as}"
            )
    if weights is not None:
        options["weights"] = None if weights == NO_WEIGHTS else weights
    encoder = entry.factory(**options)
    preprocessing = getattr(encoder, "preprocessing", None)
    missing = [key for key in PREPROCESSING_KEYS if not isinstance(preprocessing, dict) or key not in preprocessing]
    if missing or not isinstance(getattr(encoder, "embedding_dim", None), int):
        raise XselError(
            f"encoder {name!r} from plugin {entry.plugin!r} breaks the encoder contract "
            f"(missing preprocessing keys {missing} or embedding_dim); report it to the plugin's author"
        )
    check_preprocessing(encoder.preprocessing, source=f"encoder {name!r} (plugin {entry.plugin!r}) preprocessing")
    if record is not None and isinstance(record.get("preprocessing"), dict):
        encoder.preprocessing = {**encoder.preprocessing, **record["preprocessing"]}
        check_preprocessing(encoder.preprocessing, source=f"--weights {weights}: the preprocessing it records")
    if image_size is not None:
        if image_size < 8:
            raise InputError(f"--image-size {image_size}: use at least 8 pixels")
        default_size = int(encoder.preprocessing["image_size"])
        encoder.preprocessing = {**encoder.preprocessing, "image_size": int(image_size)}
        if image_size < default_size:
            _check_small_size(encoder.eval(), entry.name, int(image_size), default_size)
    return encoder.eval()


def _runs_at(encoder, size: int) -> bool:
    import torch

    with torch.no_grad():
        try:
            encoder(torch.zeros(2, int(encoder.preprocessing["channels"]), size, size))
        except RuntimeError:
            return False
    return True


def _check_small_size(encoder, name: str, size: int, default_size: int) -> None:
    """Refuse a size below the plugin's default at which the network cannot run (DenseNet pools to 0×0 below 29 px).

    Only sizes under the default are tried, so the probe costs at most one small forward; on failure a bisection up
    to the default finds the smallest size that runs, for the message.
    """
    if _runs_at(encoder, size):
        return
    low, high = size, default_size  # fails at low; the default is assumed to run
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _runs_at(encoder, middle) else (middle, high)
    raise InputError(f"--image-size {size} is too small for encoder {name}; use at least {high}")


def read_state_dict(path: str | Path) -> dict:
    """Read a weights file (plain state dict, ``{"state_dict": ...}`` wrapper, or a MoCo checkpoint).

    MoCo checkpoints keep only the query encoder (``module.encoder_q.`` / ``encoder_q.`` stripped) and
    DataParallel's ``module.`` prefix is removed; heads are left for the caller to drop.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--weights {path}: file not found; pass a state-dict file, 'imagenet' or 'none'")
    try:
        loaded = _load_tensors(path)
    except Exception as error:
        raise InputError(
            f"--weights {path}: cannot read it as PyTorch weights ({type(error).__name__}); "
            "expected a state dict or a MoCo checkpoint saved with torch.save"
        ) from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"--weights {path}: no state dict of tensors found inside")
    if any(key.startswith(MOCO_PREFIXES) for key in loaded):
        loaded = {
            key[len(prefix) :]: value
            for key, value in loaded.items()
            for prefix in MOCO_PREFIXES
            if key.startswith(prefix)
        }
    return {
        next((key[len(p) :] for p in WRAPPER_PREFIXES if key.startswith(p)), key): value
        for key, value in loaded.items()
    }


def load_weights(model, path: str | Path, *, drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load a weights file into ``model`` strictly, after dropping head keys; mismatches name the keys."""
    load_state(model, read_state_dict(path), path, drop_prefixes=drop_prefixes)


def load_state(model, state: dict, path: str | Path, *, drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load a state dict read from ``path`` (named in messages) into ``model`` strictly, after dropping head keys:
    for plugins that read a file format of their own."""
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong_shape),
    ):
        if keys:
            shown = ", ".join(keys[:3]) + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise InputError(
            f"--weights {path} does not fit {type(model).__name__} ({'; '.join(problems)}); "
            "check the architecture the file was trained with"
        )
    model.load_state_dict(state, strict=True)
