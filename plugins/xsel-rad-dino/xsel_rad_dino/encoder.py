"""RAD-DINO as an xsel encoder: the CLS token of a transformers ``Dinov2Model``, its image processor as data.

The embedding is ``pooler_output``: the CLS token after the final layer norm, what the model card's ``RadDino``
class returns as ``cls_token`` and recommends for classification, clustering and retrieval. The position
embeddings are interpolated to the input size inside the model, so ``--image-size`` works (518 px is the
published size; smaller is faster and departs from how the model was trained).

The folder's ``preprocessor_config.json`` (a ``BitImageProcessor``: resize the short side, centre crop, rescale
to [0, 1], normalise) becomes xsel preprocessing; a folder without one, and ``--weights none``, get RAD-DINO's
published values (:data:`RAD_DINO_PREPROCESSING`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from xsel.errors import InputError

REPO = "microsoft/rad-dino"
HUB = "hub"
RANDOM_INIT_SEED = 0  # `--weights none` gives the same network in every process
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
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


def preprocessing_from_processor(config: dict, source: Path) -> dict:
    """xsel preprocessing for an image processor that resizes the short side, centre-crops a square, rescales by
    1/255 and normalises; anything else is refused rather than approximated."""
    short = config.get("size", {}).get("shortest_edge")
    crop = config.get("crop_size", {})
    side = crop.get("height")
    resample = config.get("resample", 3)
    supported = (
        isinstance(short, int)
        and config.get("do_resize", True)
        and config.get("do_center_crop", True)
        and isinstance(side, int)
        and side == crop.get("width")
        and side <= short
        and config.get("do_rescale", True)
        and math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255)
        and config.get("do_normalize", True)
        and len(config.get("image_mean", ())) == 3
        and len(config.get("image_std", ())) == 3
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
    return preprocessing


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
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "dinov2":
        raise InputError(f"{config_file}: model_type {model_type!r}, expected 'dinov2' (RAD-DINO is a DINOv2 ViT)")
    try:
        model = Dinov2Model.from_pretrained(folder, local_files_only=True)
    except OSError as error:
        raise InputError(f"--weights {weights}: cannot load the model in {folder} ({error})") from None
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        preprocessing = preprocessing_from_processor(json.loads(processor_file.read_text()), processor_file)
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
