"""torchxrayvision models as xsel encoders: pooled features, with torchxrayvision's preprocessing as data.

The embedding is what torchxrayvision's feature methods compute (``DenseNet.features2``, ``ResNet.features``,
the autoencoder's ``encode`` averaged over space) without two things they add: the silent resize to the
model's native size (``utils.fix_resolution``, which would freeze one input size into an exported graph and
undo ``--image-size``) and the first-batch range check (``utils.warn_normalization``, a data-dependent
branch). The input range and crop are applied by xsel's preprocessing instead, so ``xsel export`` and the
site runtime reproduce them without torchxrayvision.

Weights: a named set is downloaded by torchxrayvision into its cache (``~/.torchxrayvision/models_data/``)
and loaded by it. A local file named like one of torchxrayvision's release files (copied from a connected
machine's cache) is loaded by torchxrayvision from its folder, without a download; torchxrayvision unpickles
its DenseNet files, so pass only files you trust. Any other file is read as a state dict of the
torchxrayvision model (``torch.load(weights_only=True)``; classifier, ``op_threshs`` and decoder keys dropped).
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xsel.encoders import load_weights
from xsel.errors import InputError
from xsel_torchxrayvision import WEIGHT_SETS

RANDOM_INIT_SEED = 0  # `--weights none` gives the same network in every process
XRV_OUTPUTS = 18  # torchxrayvision's default pathology count: the head size of its randomly initialised models
# torchxrayvision's input convention: one channel scaled to [-1024, 1024] (utils.normalize: (2 x/255 - 1) 1024).
# xsel decodes to [0, 1], so mean 0.5 and std 1/2048 give exactly 2048 x - 1024. Then XRayCenterCrop (the centred
# square of the short side) and XRayResizer (torchxrayvision resizes with skimage, xsel with Pillow's bilinear
# filter: equal up to interpolation detail).
XRV_INPUT = {"channels": 1, "mean": [0.5], "std": [1 / 2048], "crop": "center"}
# torchxrayvision's short names for two of the DenseNet sets
ALIASES = {"chex": "chexpert", "pc": "padchest"}


@dataclass(frozen=True)
class Architecture:
    embedding_dim: int
    image_size: int
    dropped: tuple[str, ...]  # state-dict key prefixes the encoder does not hold (heads, decoder)


ARCHITECTURES = {
    "xrv-densenet121": Architecture(1024, 224, ("classifier.", "op_threshs")),
    "xrv-resnet50": Architecture(2048, 512, ("model.fc.", "op_threshs")),
    "xrv-autoencoder": Architecture(512, 224, ("uplayer", "conv1_1.")),
}


def import_xrv():
    """torchxrayvision, imported so that its module-level ``warnings.filterwarnings("ignore")`` does not silence
    every warning of the process."""
    with warnings.catch_warnings():
        import torchxrayvision

    return torchxrayvision


class DenseNetEncoder(nn.Module):
    """``xrv.models.DenseNet.features2``: ReLU and global average pooling over the dense blocks' output."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features = densenet.features  # same state-dict keys as torchxrayvision's DenseNet

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)


class ResNetEncoder(nn.Module):
    """``xrv.models.ResNet.features``: the torchvision ResNet (one input channel) up to its pooled features."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.model = resnet.model  # same state-dict keys as torchxrayvision's ResNet
        self.model.fc = nn.Identity()

    def forward(self, x):
        return self.model(x)


class AutoencoderEncoder(nn.Module):
    """``xrv.autoencoders._ResNetAE.encode`` (the decoder is left out), averaged over space."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(autoencoder, name))  # same state-dict keys as torchxrayvision's autoencoder

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


WRAPPERS = {"xrv-densenet121": DenseNetEncoder, "xrv-resnet50": ResNetEncoder, "xrv-autoencoder": AutoencoderEncoder}


def resolve_weights(name: str, weights: str) -> str | None:
    """torchxrayvision's weights name for an xsel name (``chexpert``), its short (``chex``) or full name; else None."""
    sets = WEIGHT_SETS[name]
    key = ALIASES.get(weights, weights)
    if key in sets:
        return sets[key]
    return weights if weights in sets.values() else None


def _release_file(xrv, xrv_name: str) -> str:
    """The file name torchxrayvision stores the named weights under."""
    urls = xrv.autoencoders.model_urls if xrv_name in xrv.autoencoders.model_urls else xrv.models.model_urls
    return Path(urls[xrv_name]["weights_url"]).name


def _random_model(xrv, name: str) -> nn.Module:
    if name == "xrv-densenet121":
        return xrv.models.DenseNet(weights=None)
    if name == "xrv-autoencoder":
        return xrv.autoencoders.ResNetAE(weights=None)
    # xrv.models.ResNet cannot be built without downloading weights; this is its __init__ for "resnet50-*".
    import torchvision

    holder = nn.Module()
    holder.model = torchvision.models.resnet50(num_classes=XRV_OUTPUTS, weights=None)
    holder.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return holder


def _named_model(xrv, name: str, xrv_name: str, weights: str, cache_dir: Path | None) -> nn.Module:
    """torchxrayvision's own constructor: downloads into its cache unless the file already lies in ``cache_dir``."""
    constructor = {
        "xrv-densenet121": xrv.models.DenseNet,
        "xrv-resnet50": xrv.models.ResNet,
        "xrv-autoencoder": xrv.autoencoders.ResNetAE,
    }[name]
    folder = Path(cache_dir) if cache_dir is not None else Path(xrv.utils.get_cache_dir())
    path = folder / _release_file(xrv, xrv_name)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its download messages are diagnostics, not results
            return constructor(weights=xrv_name, cache_dir=None if cache_dir is None else str(cache_dir))
    except OSError as error:  # no network, proxy, full disk (requests' errors are OSErrors too)
        raise InputError(
            f"--weights {weights}: cannot download torchxrayvision's {xrv_name} weights ({type(error).__name__}: "
            f"{error}); download them once where there is internet (torchxrayvision caches them in "
            f"{folder}) and pass the file: --weights PATH/{path.name}"
        ) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise InputError(
            f"--weights {weights}: cannot read torchxrayvision's weights file {path} ({type(error).__name__}); "
            "it is damaged or incomplete: delete it to download it again"
        ) from None


def build_encoder(name: str, weights: str | None = None) -> nn.Module:
    """Encoder ``name`` in eval mode. ``weights``: None (seeded random init), a named set, or a local file."""
    xrv = import_xrv()
    architecture = ARCHITECTURES[name]
    state_file = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if weights is None:
            model = _random_model(xrv, name)
        elif (xrv_name := resolve_weights(name, weights)) is not None:
            model = _named_model(xrv, name, xrv_name, weights, None)
        else:
            path = Path(weights)
            if not path.is_file():
                raise InputError(
                    f"--weights {weights}: neither a weight set of {name} ({', '.join(WEIGHT_SETS[name])}, or "
                    "torchxrayvision's own names) nor an existing file; pass one of those, a file, or 'none'"
                )
            releases = {_release_file(xrv, xrv_name): xrv_name for xrv_name in WEIGHT_SETS[name].values()}
            if path.name in releases:
                model = _named_model(xrv, name, releases[path.name], weights, path.parent)
            else:
                model, state_file = _random_model(xrv, name), path
    encoder = WRAPPERS[name](model)
    if state_file is not None:
        load_weights(encoder, state_file, drop_prefixes=architecture.dropped)
    encoder.embedding_dim = architecture.embedding_dim
    encoder.preprocessing = {"image_size": architecture.image_size, **XRV_INPUT}
    return encoder.eval()
