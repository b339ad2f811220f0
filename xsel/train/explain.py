"""``xsel explain``: Grad-CAM heatmaps of a classifier's label on chest X-rays (Selvaraju et al. 2017).

The network is rebuilt from ``classifier.pt``: the encoder named in its identity, its fine-tuned ``state_dict``
and the linear head. A linear probe (trained on a store, no ``state_dict``) is explained only when ``weights``
rebuilds exactly the encoder that embedded the store (same ``weights_sha256``); otherwise it is an input error,
because Grad-CAM needs the convolutional network, not just the embeddings.

Target layer per architecture: ResNets ``layer4``; DenseNet-121 ``features`` followed by the ReLU its forward
applies (so the map is of the features that are pooled); any other encoder the last of its top-level child
modules that contains a ``Conv2d``. Heatmap = ReLU(Σ_k α_k A_k), α_k = spatial mean of ∂logit/∂A_k, upsampled
bilinearly to the image and divided by its maximum: float32 (H, W) in [0, 1].

Output, directly in the folder: ``<image stem>.png`` (overlay) and ``<image stem>.npy`` (heatmap) per image
(``-2``, ``-3``… appended when stems repeat), ``contact_sheet.png``, ``explain.csv`` (Path, probability, files)
and ``errors.csv`` for images that failed to decode. Images larger than ``max_side`` are shown and mapped at
that size (long side), which keeps overlays of 3000-pixel radiographs readable and small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from xsel import plots
from xsel.encoders import create_encoder, weights_sha256
from xsel.errors import InputError
from xsel.io.atomic import write_atomic
from xsel.io.images import decode_or_error, preprocess
from xsel.io.table import PATH_COLUMN, read_image_table, write_csv_atomic, write_errors_csv
from xsel.progress import notify, progress_bar
from xsel.train.head import load_classifier
from xsel.train.runtime import resolve_device

CONTACT_SHEET = "contact_sheet.png"
TABLE = "explain.csv"
ERRORS = "errors.csv"
OVERLAY_ALPHA = 0.45
SHEET_LIMIT = 48


@dataclass(frozen=True)
class ExplainResult:
    """Where the heatmaps went; ``table`` has one row per explained image."""

    out_dir: Path
    label: str
    table: pd.DataFrame
    failed: int
    contact_sheet: Path | None
    errors_csv: Path | None


def rebuild_backbone(classifier, weights: str | None = None):
    """The encoder network the classifier's head reads, in eval mode (see the module docstring for the rule)."""
    identity = classifier.encoder_identity
    name, size = identity.get("encoder"), int(identity["preprocessing"]["image_size"])
    if classifier.backbone_state is not None:
        if weights is not None:
            raise InputError(f"{classifier.path} carries its fine-tuned network; leave out --weights")
        backbone = create_encoder(name, "none", image_size=size)
        try:
            backbone.load_state_dict(classifier.backbone_state, strict=True)
        except RuntimeError:
            raise InputError(f"{classifier.path}: its state_dict does not fit the {name} encoder") from None
        return backbone.eval()
    if weights is None:
        raise InputError(
            f"{classifier.path} is a linear probe trained on a store (no fine-tuned network); pass --weights with "
            "the weights the store was embedded with (none, imagenet or a file), or fine-tune with "
            "`xsel train classifier` without --store"
        )
    backbone = create_encoder(name, weights, image_size=size)
    found, expected = weights_sha256(backbone), identity.get("weights_sha256")
    if found != expected:
        raise InputError(
            f"--weights {weights} gives {name} weights {found[:12]}, but {classifier.path} was trained on "
            f"embeddings of weights {str(expected)[:12]}; pass the weights the store was embedded with"
        )
    return backbone.eval()


def target_layer(backbone) -> tuple[object, bool]:
    """The module whose output Grad-CAM weighs, and whether a ReLU follows it in the forward pass."""
    if hasattr(backbone, "layer4"):  # torchvision ResNets
        return backbone.layer4, False
    if hasattr(backbone, "features") and type(backbone).__name__ == "DenseNet":  # forward: relu(features(x))
        return backbone.features, True
    convolutional = [child for child in backbone.children() if any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not convolutional:
        raise InputError(f"encoder {type(backbone).__name__} has no convolution layer; Grad-CAM needs one")
    return convolutional[-1], False


def grad_cam(backbone, head, layer, images, label_index: int, *, relu_after: bool = False):
    """Low-resolution Grad-CAM maps (B, h, w) (not normalised) and the label's probabilities (B,).

    Samples are independent in eval mode, so one backward pass of the summed logits gives every image's gradient.
    The input requires grad so the activation is in the graph even when every parameter is frozen.
    """
    captured = {}

    def hook(module, inputs, output):
        activation = F.relu(output) if relu_after else output
        captured["activation"] = activation
        return activation.clone()  # the network may modify its input in place (DenseNet's relu)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = head(backbone(images.detach().requires_grad_(True)))[:, label_index]
            if "activation" not in captured:
                raise InputError(
                    f"Grad-CAM layer {type(layer).__name__} is not called by {type(backbone).__name__}'s forward; "
                    "the encoder cannot be explained"
                )
            (gradient,) = torch.autograd.grad(logits.sum(), captured["activation"])
    finally:
        handle.remove()
    activation = captured["activation"].detach()
    if activation.ndim != 4:
        raise InputError(f"Grad-CAM layer {type(layer).__name__} gives {activation.ndim}-d output, not (B, C, h, w)")
    alpha = gradient.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((alpha * activation).sum(dim=1))
    return cams.detach().float().cpu(), torch.sigmoid(logits.detach().double()).cpu().numpy()


def upsample(cam, shape: tuple[int, int]) -> np.ndarray:
    """A low-resolution map resized bilinearly to ``shape`` (H, W) and scaled to [0, 1] by its maximum."""
    resized = F.interpolate(cam[None, None].float(), size=shape, mode="bilinear", align_corners=False)[0, 0]
    resized = resized.clamp(min=0).numpy()
    peak = float(resized.max())
    return (resized / peak if peak > 0 else resized).astype(np.float32)


def overlay(gray: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB uint8: the X-ray in gray with the heatmap in the 'jet' colormap blended where it is high."""
    colors = colormaps["jet"](heatmap)[..., :3]
    weight = OVERLAY_ALPHA * heatmap[..., None]
    rgb = (1 - weight) * gray[..., None] + weight * colors
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _shrink(gray: np.ndarray, max_side: int) -> np.ndarray:
    height, width = gray.shape
    if max(height, width) <= max_side:
        return gray
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, number = stem, 1
    while candidate.lower() in used:
        number += 1
        candidate = f"{stem}-{number}"
    used.add(candidate.lower())
    return candidate


def explain(
    checkpoint: str | Path,
    csv: str | Path,
    label: str,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    weights: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    max_side: int = 1024,
    show_progress: bool = True,
) -> ExplainResult:
    """Grad-CAM of ``label`` for every image of ``csv``, written into ``out`` (see the module docstring)."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: use 1 or more")
    if max_side < 1:
        raise InputError(f"--max-side {max_side}: use 1 or more pixels, e.g. 1024")
    classifier = load_classifier(checkpoint)
    label_index = classifier.label_index(label)
    backbone = rebuild_backbone(classifier, weights)
    layer, relu_after = target_layer(backbone)
    table = read_image_table(csv, image_root)
    torch_device = resolve_device(device)
    backbone.to(torch_device)
    head = classifier.head.to(torch_device)
    preprocessing = classifier.encoder_identity["preprocessing"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    used = {Path(CONTACT_SHEET).stem, Path(TABLE).stem, Path(ERRORS).stem}
    rows, errors, sheet = [], [], []
    with progress_bar("Grad-CAM", total=len(table.files), show=show_progress) as advance:
        for start in range(0, len(table.files), batch_size):
            grays, inputs, indices = [], [], []
            for index in range(start, min(start + batch_size, len(table.files))):
                gray, error = decode_or_error(table.files[index], None)
                if error is not None:
                    errors.append((table.paths[index], error))
                    continue
                grays.append(_shrink(gray, max_side))
                inputs.append(preprocess(gray, preprocessing))
                indices.append(index)
            advance(min(batch_size, len(table.files) - start))
            if not inputs:
                continue
            cams, probabilities = grad_cam(
                backbone,
                head,
                layer,
                torch.from_numpy(np.stack(inputs)).to(torch_device),
                label_index,
                relu_after=relu_after,
            )
            if cams.shape[1] * cams.shape[2] == 1 and start == 0:
                notify(
                    f"{type(layer).__name__} maps {preprocessing['image_size']}-pixel inputs to 1×1: the heatmaps "
                    "are uniform; train at a larger --image-size to localise"
                )
            for cam, gray, index, probability in zip(cams, grays, indices, probabilities, strict=True):
                heatmap = upsample(cam, gray.shape)
                stem = _unique_stem(Path(table.paths[index]).stem or "image", used)
                picture = overlay(gray, heatmap)
                write_atomic(out / f"{stem}.npy", lambda path, h=heatmap: np.save(path, h))
                write_atomic(out / f"{stem}.png", lambda path, p=picture: Image.fromarray(p).save(path, "PNG"))
                rows.append(
                    {
                        PATH_COLUMN: table.paths[index],
                        "probability": float(probability),
                        "overlay": f"{stem}.png",
                        "heatmap": f"{stem}.npy",
                    }
                )
                if len(sheet) < SHEET_LIMIT:
                    sheet.append((stem, float(probability), picture))
    if not rows:
        first = f" (first: {errors[0][0]}: {errors[0][1]})" if errors else ""
        raise InputError(f"{table.csv_path}: none of the {len(table.files)} images could be read{first}")
    frame = pd.DataFrame(rows)
    write_csv_atomic(frame, out / TABLE)
    errors_csv = write_errors_csv(out / ERRORS, [path for path, _ in errors], [message for _, message in errors])
    sheet_path = contact_sheet(sheet, label, out / CONTACT_SHEET)
    return ExplainResult(out, label, frame, len(errors), sheet_path, errors_csv)


def contact_sheet(items: list[tuple[str, float, np.ndarray]], label: str, path: Path) -> Path:
    """A grid of overlays, each titled with its file stem and the label's probability (matplotlib, atomic)."""
    columns = min(6, len(items))
    lines = -(-len(items) // columns)
    figure, axes = plots.plt.subplots(lines, columns, figsize=(2.2 * columns, 2.4 * lines), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (stem, probability, picture) in zip(axes.ravel(), items, strict=False):
        axis.imshow(picture)
        axis.set_title(f"{stem[:22]}\np({label})={probability:.2f}", fontsize=7)
    figure.suptitle(f"Grad-CAM: {label}", fontsize=10)
    return plots.save_figure(figure, path)
