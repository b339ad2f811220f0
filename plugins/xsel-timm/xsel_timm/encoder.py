"""timm models as xsel encoders: pooled pre-logits features, preprocessing from the model's ``pretrained_cfg``.

The model is built with ``num_classes=0``, so its forward is ``forward_features`` + ``forward_head(pre_logits=True)``
(global pooling, or the class token and norm for ViTs). ``timm.data.resolve_model_data_config`` gives the input
size, mean/std, interpolation and eval crop (``crop_pct``, ``crop_mode``), which map onto xsel's preprocessing keys
so ``xsel export`` and the site runtime reproduce them. Gray X-rays are replicated to the model's channels.

Weights: ``hub`` loads timm's pretrained weights (the tag in the name, else timm's default tag) from the Hugging
Face hub, cached in ``~/.cache/huggingface``; a local file (state dict or ``.safetensors``, read by timm with
``torch.load(weights_only=True)``) is loaded strictly through timm's checkpoint filter (which adapts
original-format checkpoints), then the classifier is dropped.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from xsel.errors import InputError
from xsel.io.images import RESAMPLING

RANDOM_INIT_SEED = 0  # `--weights none` gives the same network in every process
HUB = "hub"


class TimmEncoder(nn.Module):
    """A timm model without its classifier. Setting ``preprocessing`` to another ``image_size`` (what
    ``--image-size`` does) resizes the network too: models with a size-dependent layout (ViT position embeddings,
    window sizes) are rebuilt for it with timm's ``set_input_size``; CNNs need nothing."""

    def __init__(self, model: nn.Module, name: str, preprocessing: dict, embedding_dim: int):
        super().__init__()
        self.model = model
        self.model_name = name
        self.embedding_dim = embedding_dim
        self._preprocessing = dict(preprocessing)

    @property
    def preprocessing(self) -> dict:
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: dict) -> None:
        size = int(value["image_size"])
        if size != int(self._preprocessing["image_size"]):
            if hasattr(self.model, "set_input_size"):
                try:
                    self.model.set_input_size(size)
                except (AssertionError, RuntimeError, ValueError) as error:  # patch or window size constraints
                    raise InputError(
                        f"--image-size {size}: timm model {self.model_name} cannot run at that size ({error})"
                    ) from None
            elif self.model.pretrained_cfg.get("fixed_input_size", False):
                raise InputError(
                    f"--image-size {size}: timm model {self.model_name} takes only "
                    f"{self._preprocessing['image_size']} px inputs; leave out --image-size"
                )
        self._preprocessing = dict(value)

    def forward(self, x):
        return self.model(x)


def _check_name(model_name: str) -> None:
    arch, _, tag = model_name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"did you mean {', '.join(f'timm:{c}' for c in close)}?" if close else "see timm.list_models()"
        raise InputError(f"--encoder timm:{model_name}: timm {timm.__version__} has no model {arch!r}; {hint}")
    if tag and not timm.models.is_model_pretrained(model_name):
        tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
        raise InputError(
            f"--encoder timm:{model_name}: timm has no pretrained tag {tag!r} for {arch}; "
            f"choose one of: {', '.join(tags) or 'none (leave out the tag)'}"
        )


def _create(model_name: str, weights: str | None) -> nn.Module:
    if weights is None:
        return timm.create_model(model_name, pretrained=False, num_classes=0)
    if weights == HUB:
        if not timm.models.is_model_pretrained(model_name):
            raise InputError(f"--weights hub: timm has no pretrained weights for {model_name}; pass a file or 'none'")
        try:
            return timm.create_model(model_name, pretrained=True, num_classes=0)
        except OSError as error:  # offline, proxy, full disk: huggingface_hub's errors are OSErrors
            raise InputError(
                f"--weights hub: cannot download timm's {model_name} weights from the Hugging Face hub "
                f"({type(error).__name__}); download them once where there is internet (they are cached), or pass "
                "a local state-dict or .safetensors file: --weights FILE"
            ) from None
    return _create_from_file(model_name, weights)


def _create_from_file(model_name: str, weights: str) -> nn.Module:
    """Load a local file strictly. timm relaxes strictness whenever the head size differs from its pretrained
    config's, which would leave a wrong file half-loaded in silence; so the model is built with the file's own head
    size (read from the file), loaded strictly through timm's checkpoint filter, and its head removed after."""
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"--weights {weights}: not 'hub', 'none' or an existing state-dict / .safetensors file")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:  # torch.load and safetensors report an unreadable file with many types
        raise InputError(
            f"--weights {weights}: cannot read it as a state dict or .safetensors file ({type(error).__name__})"
        ) from None
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    classifiers = getattr(pretrained_cfg, "classifier", None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head = next((state[f"{c}.weight"] for c in classifiers if f"{c}.weight" in state), None)
    num_classes = 0 if head is None else int(head.shape[0])
    try:
        model = timm.create_model(
            model_name,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay={"state_dict": state, "num_classes": num_classes},
        )
    except (RuntimeError, KeyError, ValueError) as error:  # strict load_state_dict, or the checkpoint filter
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise InputError(
            f"--weights {weights} does not load into timm model {model_name} ({type(error).__name__}: {first_line}); "
            "pass weights of the same architecture"
        ) from None
    model.reset_classifier(0)
    return model


def preprocessing_from_cfg(model_name: str, config: dict) -> dict:
    """xsel preprocessing for timm's data config: size, mean/std, interpolation, and the eval crop (``crop_mode``
    ``center``: the centred square, then the central ``crop_pct``; ``squash``: the central ``crop_pct`` of the whole
    image; ``border`` — letterbox — is approximated by ``center``)."""
    channels, height, width = config["input_size"]
    if height != width:
        raise InputError(f"timm model {model_name} expects {height}×{width} inputs; xsel feeds square images")
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in RESAMPLING:
        raise InputError(f"timm model {model_name} resizes with {interpolation!r}; xsel knows {', '.join(RESAMPLING)}")
    preprocessing = {
        "image_size": int(height),
        "channels": int(channels),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": interpolation,
    }
    if config.get("crop_mode", "center") != "squash":
        preprocessing["crop"] = "center"
    crop_pct = float(config.get("crop_pct") or 1.0)
    if crop_pct < 1:  # timm pads for crop_pct > 1; xsel keeps the whole image
        preprocessing["crop_pct"] = crop_pct
    return preprocessing


def build_encoder(model_name: str, weights: str | None = None) -> TimmEncoder:
    """``timm:<model_name>`` in eval mode. ``weights``: None (seeded random init), ``"hub"`` or a local file."""
    _check_name(model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = _create(model_name, weights)
    preprocessing = preprocessing_from_cfg(model_name, resolve_model_data_config(model))
    embedding_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return TimmEncoder(model, model_name, preprocessing, embedding_dim).eval()
