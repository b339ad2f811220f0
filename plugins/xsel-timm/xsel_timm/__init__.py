"""An xsel encoder plugin: every timm model as an encoder, ``--encoder timm:<model>`` (CNNs and ViTs alike).

One family registration (``prefix=True``) covers timm's whole registry, pretrained tags included
(``timm:vit_base_patch16_224.augreg_in21k``). Registering imports neither torch nor timm.
"""

from __future__ import annotations

from xsel import hookimpl


def build(model_name: str, weights: str | None = None):
    """Build ``timm:<model_name>``; ``weights``: None (seeded random init), ``"hub"`` or a local file."""
    from xsel_timm.encoder import build_encoder

    return build_encoder(model_name, weights)


@hookimpl
def register_encoders(register):
    register(
        "timm:",
        build,
        prefix=True,
        metavar="model",
        description="any timm model (timm.list_models()), pooled pre-logits features; preprocessing from its "
        "pretrained_cfg; weights none (default)|hub|FILE",
        weights=("hub",),
    )
