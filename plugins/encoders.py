"""Built-in encoders: torchvision CNNs (resnet18, resnet50, densenet121) and the cheap ``pixels`` encoder.

Registering imports no torch; each factory imports it when an encoder is built.
"""

from __future__ import annotations

from functools import partial

from xsel import hookimpl
from xsel.encoders import load_weights
from xsel.errors import InputError

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# architecture → (torchvision weights enum, pooled feature size, head attribute replaced by Identity)
TORCHVISION_ARCHS = {
    "resnet18": ("ResNet18_Weights", 512, "fc"),
    "resnet50": ("ResNet50_Weights", 2048, "fc"),
    "densenet121": ("DenseNet121_Weights", 1024, "classifier"),
}
RANDOM_INIT_SEED = 0  # `--weights none` gives the same network in every process


def build_torchvision(arch: str, weights: str | None = None, image_size: int = 224):
    """A torchvision CNN without its classifier head: the pooled feature is the embedding.

    ``weights``: None (seeded random init), ``"imagenet"`` (torchvision's download, cached in
    ``$TORCH_HOME``), or a local file: a state dict or a MoCo checkpoint (projection head dropped).
    """
    import torch
    import torchvision

    enum_name, dim, head = TORCHVISION_ARCHS[arch]
    build = getattr(torchvision.models, arch)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: never from the caller's random state
        torch.manual_seed(RANDOM_INIT_SEED)
        if weights != "imagenet":
            model = build(weights=None)
        else:
            try:  # torchvision's own loader: it also renames the old keys DenseNet's published files still use
                model = build(weights=getattr(torchvision.models, enum_name).DEFAULT, progress=True)
            except (OSError, RuntimeError) as error:  # no network, proxy, full disk; a cached file failing its hash
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise InputError(
                    f"--weights imagenet: cannot load torchvision's {arch} weights ({reason}); download them once "
                    "where there is internet (delete a damaged file in $TORCH_HOME), or pass a local state-dict file"
                ) from None
    setattr(model, head, torch.nn.Identity())
    if weights not in (None, "imagenet"):
        load_weights(model, weights, drop_prefixes=(f"{head}.",))
    model.embedding_dim = dim
    model.preprocessing = {"image_size": image_size, "channels": 3, **IMAGENET}
    return model.eval()


def build_pixels(weights: str | None = None, thumbnail: int = 32, image_size: int = 128):
    """Average the gray image down to ``thumbnail``² values, then standardise them per image.

    After standardisation the cosine similarity of two embeddings is the correlation of their
    thumbnails: a meaningful baseline that needs neither weights nor a GPU.
    """
    import torch

    if weights is not None:
        raise InputError("the pixels encoder has no weights; leave out --weights or pass --weights none")
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(thumbnail),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(thumbnail * thumbnail, eps=1e-8, elementwise_affine=False),
    )
    model.embedding_dim = thumbnail * thumbnail
    model.preprocessing = {"image_size": image_size, "channels": 1, "mean": [0.0], "std": [1.0]}
    return model.eval()


@hookimpl
def register_encoders(register):
    for arch, (_, dim, _) in TORCHVISION_ARCHS.items():
        register(
            arch,
            partial(build_torchvision, arch),
            description=f"torchvision {arch}, {dim}-d pooled features; weights none|imagenet|FILE|MoCo",
            weights=("none", "imagenet"),
        )
    register("pixels", build_pixels, description="32×32 gray thumbnail, standardised (1024-d); no weights")
