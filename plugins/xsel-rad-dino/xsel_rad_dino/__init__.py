"""An xsel encoder plugin: RAD-DINO (Pérez-García et al., Microsoft), a DINOv2 ViT-B/14 trained on chest X-rays.

Loaded with transformers (``Dinov2Model``) from the model's own format: a folder holding ``config.json``,
``model.safetensors`` and ``preprocessor_config.json`` (a snapshot of ``microsoft/rad-dino`` on the Hugging Face
hub). Registering imports neither torch nor transformers.
"""

from __future__ import annotations

from xsel import hookimpl


def build(weights: str | None = None):
    """Build ``rad-dino``; ``weights``: None (seeded random init), ``"hub"``, or a local model folder."""
    from xsel_rad_dino.encoder import build_encoder

    return build_encoder(weights)


@hookimpl
def register_encoders(register):
    register(
        "rad-dino",
        build,
        description="RAD-DINO (DINOv2 ViT-B/14 on chest X-rays), 768-d CLS token; 518 px, centre crop, bicubic, "
        "mean 0.5307 std 0.2583; weights none (default)|hub|FOLDER",
        weights=("hub",),
    )
