"""torchxrayvision models as xsel encoders: pooled features, with torchxrayvision's preprocessing as data.

The embedding is what torchxrayvision's feature methods compute (``DenseNet.features2``, ``ResNet.features``,
the autoencoder's ``encode`` averaged over space) without two things they add: the silent resize to the
model's native size (``utils.fix_resolution``, which would freeze one input size into an exported graph and
undo ``--image-size``) and the first-batch range check (``utils.warn_normalization``, a data-dependent
branch). The input range and crop are applied by xsel's preprocessing instead, so ``xsel export`` and the
site runtime reproduce them without torchxrayvision.

Weights, and the trust boundary. torchxrayvision's constructors unpickle their weights files with
``torch.load(weights_only=False)``, which runs any code a pickle holds, so they never see a file xsel did not
watch them download. A named set (``--weights all``) is fetched once by torchxrayvision itself, into a fresh
temporary folder, from its release URL, and loaded by its own constructor: that file is as trusted as the
torchxrayvision package. Its state dict (tensors only) is then kept in torchxrayvision's cache
(:func:`named_weights_file`, e.g. ``xsel-densenet121-res224-all.pt``) and the download deleted; every later run
reads that file. Every
file xsel reads, that one and any ``--weights FILE``, goes through ``torch.load(weights_only=True)``: a state dict
of the torchxrayvision model, the ResNet-50 and autoencoder release files (plain state dicts), or a DenseNet
pickled whole by current torch (unpickled with only the classes of :func:`densenet_classes` allowed, its tensors
taken without calling anything stored in the file). A DenseNet release file itself is a whole model pickled by
torch < 1.6 (torchxrayvision patches its modules for that), a format whose pickled classes torch's weights-only
loader refuses: it is refused, with the one-line conversion to a state dict to run where the file is trusted.
Classifier, ``op_threshs`` and decoder keys are dropped.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xsel.encoders import load_state, read_state_dict
from xsel.errors import InputError
from xsel.io.atomic import write_atomic
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


def named_weights_file(xrv, xrv_name: str) -> Path:
    """Where xsel keeps a named set's state dict: torchxrayvision's cache folder, under a name of xsel's."""
    return Path(xrv.utils.get_cache_dir()) / f"xsel-{xrv_name}.pt"


def _fetch_named(xrv, name: str, xrv_name: str, weights: str) -> Path:
    """The state dict of a named set, made once: torchxrayvision downloads its release file into a fresh temporary
    folder and loads it with its own constructor (the one place a pickle is unpickled, and only one that
    torchxrayvision has just fetched from its release URL); its state dict is kept, the download deleted."""
    path = named_weights_file(xrv, xrv_name)
    if path.is_file():
        return path
    constructor = {
        "xrv-densenet121": xrv.models.DenseNet,
        "xrv-resnet50": xrv.models.ResNet,
        "xrv-autoencoder": xrv.autoencoders.ResNetAE,
    }[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".xsel-download-") as fresh:
        try:
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():  # its messages are diagnostics
                warnings.simplefilter("ignore")
                model = constructor(weights=xrv_name, cache_dir=fresh)
        except OSError as error:  # no network, proxy, full disk (requests' errors are OSErrors too)
            raise InputError(
                f"--weights {weights}: cannot download torchxrayvision's {xrv_name} weights ({type(error).__name__}: "
                f"{error}); run this once where there is internet, then copy {path} here and pass it: "
                f"--weights PATH/{path.name}"
            ) from None
        except Exception as error:  # a truncated or damaged download: torch's and pickle's errors
            raise InputError(
                f"--weights {weights}: torchxrayvision's download of {xrv_name} cannot be read "
                f"({type(error).__name__}); run the command again to download it again"
            ) from None
    write_atomic(path, lambda temporary: torch.save(model.state_dict(), temporary))
    return path


def densenet_classes(xrv) -> list[type]:
    """Every class a pickled torchxrayvision DenseNet (its release format, ``torch.save(model)``) is made of: the
    only objects, besides tensors and containers, that its unpickling may build."""
    models = xrv.models
    return [
        *(models.DenseNet, models._DenseBlock, models._DenseLayer, models._Transition),
        *(nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear),
    ]


def _refusal(error: Exception) -> str:
    """What torch's weights-only unpickler refused (``unsupported GLOBAL posix.system …``), in one line: the last
    line of its message before the pointer to the documentation."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation")]
    reason = lines[-1].split("WeightsUnpickler error:", 1)[-1].split(". Please", 1)[0].strip(" .") if lines else ""
    if reason.startswith("Only persistent_load"):  # torch's old format keeps the classes of a pickled model there
        return "a whole model pickled by torch < 1.6, as torchxrayvision's DenseNet release files are"
    return reason or type(error).__name__


def _densenet_state(xrv, path: Path) -> dict | None:
    """The tensors of a pickled torchxrayvision DenseNet, without running code from the file; None for a file
    that holds no pickled model (a state dict, read as for any encoder)."""
    try:
        with torch.serialization.safe_globals(densenet_classes(xrv)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about old pickles: a refusal is reported below
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, nn.Module):
            return None
        # named_parameters/named_buffers, not state_dict(): state_dict() would call hooks stored in the file
        return {name: tensor.detach() for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]}
    except Exception as error:  # a damaged file, one holding other objects, or a model built of other things
        raise InputError(
            f"--weights {path}: cannot read it as torchxrayvision DenseNet weights without running code from it "
            f"({_refusal(error)}); if the file is damaged, replace it; if you trust it, convert it where it is "
            "trusted: python -c \"import torch; torch.save(torch.load('IN.pt', weights_only=False).state_dict(), "
            "'OUT.pt')\" and pass OUT.pt"
        ) from None


def _read_weights(xrv, name: str, path: Path) -> dict:
    """The state dict in a weights file for encoder ``name``, keyed like torchxrayvision's model."""
    state = _densenet_state(xrv, path) if name == "xrv-densenet121" else None
    if state is None:
        state = read_state_dict(path)
    if name == "xrv-resnet50" and "conv1.weight" in state:  # the release file: torchvision's ResNet, xrv's `.model`
        state = {f"model.{key}": value for key, value in state.items()}
    return state


def build_encoder(name: str, weights: str | None = None) -> nn.Module:
    """Encoder ``name`` in eval mode. ``weights``: None (seeded random init), a named set, or a local file."""
    xrv = import_xrv()
    architecture = ARCHITECTURES[name]
    path = None
    if weights is not None and (xrv_name := resolve_weights(name, weights)) is not None:
        path = _fetch_named(xrv, name, xrv_name, weights)
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise InputError(
                f"--weights {weights}: neither a weight set of {name} ({', '.join(WEIGHT_SETS[name])}, or "
                "torchxrayvision's own names) nor an existing file; pass one of those, a file, or 'none'"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        encoder = WRAPPERS[name](_random_model(xrv, name))
    if path is not None:
        load_state(encoder, _read_weights(xrv, name, path), path, drop_prefixes=architecture.dropped)
    encoder.embedding_dim = architecture.embedding_dim
    encoder.preprocessing = {"image_size": architecture.image_size, **XRV_INPUT}
    return encoder.eval()
