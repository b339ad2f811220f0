"""RAD-DINO as an xsel encoder: the CLS token of a transformers ``Dinov2Model``, its image processor as data.

The embedding is ``pooler_output``: the CLS token after the final layer norm, what the model card's ``RadDino``
class returns as ``cls_token`` and recommends for classification, clustering and retrieval. The position
embeddings are interpolated to the input size inside the model, so ``--image-size`` works (518 px is the
published size; smaller is faster and departs from how the model was trained).

The folder's ``preprocessor_config.json`` (a ``BitImageProcessor``: resize the short side, centre crop, rescale
to [0, 1], normalise) becomes xsel preprocessing; a folder without one, and ``--weights none``, get RAD-DINO's
published values (:data:`RAD_DINO_PREPROCESSING`).

Only ``model.safetensors`` is read from a folder: a ``pytorch_model.bin`` is a pickle, which can run code when
loaded, so a folder that has only that is refused (with the one-line conversion to run where the file is trusted).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from xsel.errors import InputError
from xsel.io.images import check_preprocessing

REPO = "microsoft/rad-dino"
HUB = "hub"
RANDOM_INIT_SEED = 0  # `--weights none` gives the same network in every process
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of a sharded one
# microsoft/rad-dino's preprocessor_config.json: shortest edge 518, centre crop 518×518, bicubic, mean 0.5307,
# std 0.2583 (three equal channels: the X-ray replicated).
RAD_DINO_PREPROCESSING = {
    "image_size": 518,
    "channels": 3,
    "mean": [0.5307, 0.5307, 0.5307],
    "std": [0.2583, 0.2583, 0.2583],
    "interpolation": "bicubic",
    "crop": "center",
}
# Pillow's filter codes, as image processors store them in `resample`
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


class RadDinoEncoder(nn.Module):
    """``Dinov2Model`` → ``pooler_output`` (B, hidden_size)."""

    def __init__(self, model: nn.Module, preprocessing: dict):
        super().__init__()
        self.model = model
        self.embedding_dim = int(model.config.hidden_size)
        self.preprocessing = preprocessing

    def forward(self, x):
        return self.model(pixel_values=x).pooler_output


def _size_dict(value, *, square: bool) -> dict:
    """An image processor's ``size``/``crop_size`` as a dict: older configs store one int, which transformers'
    ``get_size_dict`` reads as the shortest edge (``size``) or a square (``crop_size``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    return value if isinstance(value, dict) else {}


def preprocessing_from_processor(config: dict, source: Path) -> dict:
    """xsel preprocessing for an image processor that resizes the short side, centre-crops a square, rescales by
    1/255 and normalises; anything else is refused rather than approximated."""
    short = _size_dict(config.get("size"), square=False).get("shortest_edge")
    crop = _size_dict(config.get("crop_size"), square=True)
    side = crop.get("height")
    resample = config.get("resample", 3)
    rescale = config.get("rescale_factor", 1 / 255)
    supported = (
        isinstance(short, int)
        and config.get("do_resize", True)
        and config.get("do_center_crop", True)
        and isinstance(side, int)
        and side == crop.get("width")
        and side <= short
        and config.get("do_rescale", True)
        and isinstance(rescale, int | float)
        and math.isclose(rescale, 1 / 255)
        and config.get("do_normalize", True)
        and isinstance(config.get("image_mean"), list)
        and len(config["image_mean"]) == 3
        and isinstance(config.get("image_std"), list)
        and len(config["image_std"]) == 3
        and isinstance(resample, int)
        and resample in PIL_FILTERS
    )
    if not supported:
        raise InputError(
            f"{source}: this image processor (size {config.get('size')}, crop {crop}, resample {resample}) is not "
            "the short-side resize + square centre crop + 1/255 rescale + normalise that xsel reproduces"
        )
    preprocessing = {
        "image_size": side,
        "channels": 3,
        "mean": [float(v) for v in config["image_mean"]],
        "std": [float(v) for v in config["image_std"]],
        "interpolation": PIL_FILTERS[resample],
        "crop": "center",
    }
    if side < short:
        preprocessing["crop_pct"] = side / short
    check_preprocessing(preprocessing, source=str(source))
    return preprocessing


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); copy the model folder again") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}; copy the model folder again")
    return config


def _download() -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(REPO, allow_patterns=list(FILES)))
    except OSError as error:  # offline, proxy, full disk: huggingface_hub's errors are OSErrors
        raise InputError(
            f"--weights hub: cannot download {REPO} from the Hugging Face hub ({type(error).__name__}); download it "
            f"once where there is internet (`hf download {REPO} --local-dir rad-dino`) and pass the folder: "
            "--weights rad-dino"
        ) from None


def _load_folder(folder: Path, weights: str) -> tuple[nn.Module, dict]:
    from transformers import Dinov2Model

    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise InputError(
            f"--weights {weights}: not a model folder with config.json (a snapshot of {REPO}: {', '.join(FILES)}); "
            "pass such a folder, 'hub' or 'none'"
        )
    model_type = _read_json(config_file).get("model_type")
    if model_type != "dinov2":
        raise InputError(f"{config_file}: model_type {model_type!r}, expected 'dinov2' (RAD-DINO is a DINOv2 ViT)")
    if not any((folder / name).is_file() for name in SAFETENSORS):
        raise InputError(
            f"--weights {weights}: {folder} has no model.safetensors; xsel does not unpickle pytorch_model.bin "
            '(it can run code). Where you trust the file, convert the folder: python -c "from transformers import '
            f"Dinov2Model; Dinov2Model.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    try:  # use_safetensors: never fall back to a pickled pytorch_model.bin lying next to the safetensors file
        model = Dinov2Model.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"--weights {weights}: cannot load the model in {folder} ({first})") from None
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        preprocessing = preprocessing_from_processor(_read_json(processor_file), processor_file)
    else:
        preprocessing = dict(RAD_DINO_PREPROCESSING)
    return model, preprocessing


def build_encoder(weights: str | None = None) -> RadDinoEncoder:
    """RAD-DINO in eval mode. ``weights``: None (seeded random init of the ViT-B/14 architecture), ``"hub"``
    (download ``microsoft/rad-dino`` into the Hugging Face cache), or a local model folder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if weights is None:
            from transformers import Dinov2Config, Dinov2Model

            # DINOv2 ViT-B/14 (transformers' Dinov2Config defaults) at RAD-DINO's 518 px
            model, preprocessing = Dinov2Model(Dinov2Config(image_size=518)), dict(RAD_DINO_PREPROCESSING)
        else:
            folder = _download() if weights == HUB else Path(weights)
            model, preprocessing = _load_folder(folder, weights)
    return RadDinoEncoder(model, preprocessing).eval()
