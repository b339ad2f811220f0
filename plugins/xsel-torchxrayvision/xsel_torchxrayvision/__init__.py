"""An xsel encoder plugin: the models of torchxrayvision (Cohen et al.), the standard chest X-ray model zoo.

Registers ``xrv-densenet121`` (DenseNet-121 weights trained on NIH, CheXpert, MIMIC, PadChest, RSNA or all of
them together), ``xrv-resnet50`` (512 px) and ``xrv-autoencoder`` (ResNet-101 autoencoder). Registering imports
neither torch nor torchxrayvision; :mod:`xsel_torchxrayvision.encoders` does, when an encoder is built.
"""

from __future__ import annotations

from functools import partial

from xsel import hookimpl

# xsel `--weights` name → torchxrayvision weights name, per encoder. torchxrayvision's own names (its full names
# and the short `chex`, `pc`) are accepted too; see encoders.resolve_weights.
WEIGHT_SETS = {
    "xrv-densenet121": {
        "all": "densenet121-res224-all",
        "nih": "densenet121-res224-nih",
        "chexpert": "densenet121-res224-chex",
        "padchest": "densenet121-res224-pc",
        "mimic_ch": "densenet121-res224-mimic_ch",
        "mimic_nb": "densenet121-res224-mimic_nb",
        "rsna": "densenet121-res224-rsna",
    },
    "xrv-resnet50": {"all": "resnet50-res512-all"},
    "xrv-autoencoder": {"101-elastic": "101-elastic"},
}
DESCRIPTIONS = {
    "xrv-densenet121": "torchxrayvision DenseNet-121, 1024-d pooled features; 1 channel in [-1024, 1024], centre "
    "crop, 224 px",
    "xrv-resnet50": "torchxrayvision ResNet-50, 2048-d pooled features; 1 channel in [-1024, 1024], centre crop, "
    "512 px",
    "xrv-autoencoder": "torchxrayvision ResNet-101 autoencoder, its 512-channel latent map averaged (512-d); "
    "1 channel in [-1024, 1024], centre crop, 224 px",
}


def build(name: str, weights: str | None = None):
    """Build encoder ``name``; ``weights``: None (seeded random init), a set of :data:`WEIGHT_SETS`, or a file."""
    from xsel_torchxrayvision.encoders import build_encoder

    return build_encoder(name, weights)


@hookimpl
def register_encoders(register):
    for name, weight_sets in WEIGHT_SETS.items():
        register(
            name,
            partial(build, name),
            description=f"{DESCRIPTIONS[name]}; weights none (default)|NAME|FILE",
            weights=tuple(weight_sets),
        )
