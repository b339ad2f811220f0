"""Self-supervised objectives and radiograph augmentations for ``xsel train encoder``.

Every method wraps an encoder plugin's network (``backbone``: ``(B, C, H, W)`` → ``(B, D)`` pooled
features) and turns a list of augmented views of the same images into one loss:

- ``moco`` (MoCo v2, Chen et al. 2020): query encoder + momentum key encoder, a queue of past keys as
  negatives, InfoNCE at temperature 0.2. Single-device runs have no shuffled BatchNorm: the key encoder
  sees each view batch whole (as most single-GPU MoCo re-implementations do).
- ``simclr`` (Chen et al. 2020): NT-Xent over the 2B views of a batch, the other 2B−2 as negatives.
- ``byol`` (Grill et al. 2020): online network + predictor regress the EMA target's projection
  (2 − 2·cos, symmetrised); the EMA rate rises from ``momentum`` to 1 on a cosine schedule.
- ``swav`` (Caron et al. 2020): codes from Sinkhorn-Knopp (ε = 0.05, 3 iterations) on the two global
  crops, swapped prediction from every other crop (two global + ``small_crops`` crops of half size);
  prototypes stay frozen for the first epoch. No feature queue (use batches ≥ 64).

Augmentations draw every parameter from an explicit ``numpy`` generator seeded by (run seed, epoch,
image, view), so a run is reproducible whatever the number of DataLoader workers, and a resumed run sees
the same views as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from xsel.errors import InputError

METHODS = ("moco", "simclr", "byol", "swav")
TEMPERATURES = {"moco": 0.2, "simclr": 0.2, "byol": None, "swav": 0.1}
GLOBAL_SCALE = (0.35, 1.0)  # random resized crop area of a global view (radiographs: keep most anatomy)
SMALL_SCALE = (0.1, 0.35)  # SwAV's small crops
ASPECT = (3 / 4, 4 / 3)
MAX_ROTATION = 10.0  # degrees; patients are rarely rotated more on a radiograph
BRIGHTNESS = CONTRAST = 0.2
JITTER_PROBABILITY = 0.8
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.1, 2.0)  # at 224 px, scaled with the image size
SINKHORN_EPSILON = 0.05
SINKHORN_ITERATIONS = 3


@dataclass(frozen=True)
class Crop:
    """One view's recipe: output size in pixels and the crop's share of the image area."""

    size: int
    scale: tuple[float, float] = GLOBAL_SCALE


def view_crops(method: str, image_size: int, small_crops: int) -> list[Crop]:
    """Two global views for every method; SwAV adds ``small_crops`` half-size views (multi-crop)."""
    crops = [Crop(image_size), Crop(image_size)]
    if method == "swav":
        crops += [Crop(max(image_size // 2, 16), SMALL_SCALE)] * small_crops
    return crops


def augment(gray, crop: Crop, rng: np.random.Generator):
    """One random view of a gray image ``(1, H, W)`` float tensor in [0, 1] → ``(1, S, S)`` in [0, 1].

    Small rotation, random resized crop, brightness/contrast jitter, Gaussian blur. No horizontal flip
    (it swaps the heart's side) and no colour jitter (there is no colour).
    """
    import torch
    import torchvision.transforms.v2.functional as F

    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    image = F.rotate(gray, angle, interpolation=F.InterpolationMode.BILINEAR)
    height, width = image.shape[-2:]
    top, left, crop_h, crop_w = _crop_box(height, width, crop.scale, rng)
    image = F.resized_crop(image, top, left, crop_h, crop_w, [crop.size, crop.size], antialias=True)
    if rng.random() < JITTER_PROBABILITY:
        brightness = float(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS))
        contrast = float(rng.uniform(1 - CONTRAST, 1 + CONTRAST))
        mean = image.mean()
        image = ((image - mean) * contrast + mean) * brightness
    if rng.random() < BLUR_PROBABILITY:
        sigma = float(rng.uniform(*BLUR_SIGMA)) * crop.size / 224
        kernel = max(3, int(2 * math.ceil(3 * sigma) + 1))
        image = F.gaussian_blur(image, [kernel, kernel], [max(sigma, 1e-3)] * 2)
    return torch.clamp(image, 0.0, 1.0)


def _crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator):
    """torchvision's RandomResizedCrop box, drawn from ``rng``; falls back to the whole image."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def normalize(views, preprocessing: dict):
    """Gray views in [0, 1] → the encoder's input: replicated to its channels, mean/std normalised."""
    import torch

    channels = int(preprocessing["channels"])
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(-1, 1, 1)
    return (views.expand(*views.shape[:-3], channels, *views.shape[-2:]) - mean) / std


def _projector(in_dim: int, hidden: int, out_dim: int):
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def build_method(
    method: str,
    backbone,
    *,
    projection_dim: int = 128,
    temperature: float | None = None,
    queue_size: int = 4096,
    momentum: float = 0.99,
    prototypes: int = 100,
    total_steps: int = 1,
    freeze_prototype_steps: int = 0,
):
    """The training module of ``method`` around ``backbone``; ``module(views)`` returns the loss and
    ``module.after_step(step)`` does the per-step bookkeeping (EMA targets, prototype normalisation)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if method not in METHODS:
        raise InputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    dim = int(backbone.embedding_dim)
    temperature = TEMPERATURES[method] if temperature is None else temperature

    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.projector = _projector(dim, max(dim, 512), projection_dim)

        def before_step(self, step: int) -> None:
            """Called between backward and the optimizer step (``step`` counts from 1)."""

        def after_step(self, step: int) -> None:
            """Called after each optimizer step."""

    def ema(target: nn.Module, online: nn.Module, rate: float) -> None:
        with torch.no_grad():
            for t, o in zip(target.parameters(), online.parameters(), strict=True):
                t.mul_(rate).add_(o.detach(), alpha=1 - rate)
            for t, o in zip(target.buffers(), online.buffers(), strict=True):
                t.copy_(o)

    class SimCLR(Method):
        def forward(self, views):
            first, second = views[:2]
            z = F.normalize(self.projector(self.backbone(torch.cat([first, second]))), dim=1)
            n = first.shape[0]
            logits = z @ z.T / temperature
            logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            return F.cross_entropy(logits, targets)

    class MoCo(Method):
        def __init__(self):
            super().__init__()
            self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            generator = torch.Generator().manual_seed(0)
            self.register_buffer(
                "queue", F.normalize(torch.randn(queue_size, projection_dim, generator=generator), dim=1)
            )
            self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

        def forward(self, views):
            query, key_view = views[:2]
            q = F.normalize(self.projector(self.backbone(query)), dim=1)
            with torch.no_grad():
                k = F.normalize(self.key_projector(self.key_backbone(key_view)), dim=1)
            positive = (q * k).sum(dim=1, keepdim=True)
            negative = q @ self.queue.clone().T
            logits = torch.cat([positive, negative], dim=1) / temperature
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
            self._enqueue(k.detach().float())
            return loss

        def _enqueue(self, keys) -> None:
            start = int(self.queue_pointer)
            index = (torch.arange(len(keys), device=keys.device) + start) % queue_size
            self.queue[index] = keys
            self.queue_pointer.fill_((start + len(keys)) % queue_size)

        def after_step(self, step: int) -> None:
            ema(self.key_backbone, self.backbone, momentum)
            ema(self.key_projector, self.projector, momentum)

    class BYOL(Method):
        def __init__(self):
            super().__init__()
            self.predictor = _projector(projection_dim, max(dim, 512), projection_dim)
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

        def forward(self, views):
            first, second = views[:2]
            both = torch.cat([first, second])
            online = F.normalize(self.predictor(self.projector(self.backbone(both))), dim=1)
            with torch.no_grad():
                target = F.normalize(self.target_projector(self.target_backbone(both)), dim=1)
            n = first.shape[0]
            swapped = torch.cat([target[n:], target[:n]])
            return (2 - 2 * (online * swapped).sum(dim=1)).mean()

        def after_step(self, step: int) -> None:
            rate = 1 - (1 - momentum) * (math.cos(math.pi * min(step / max(total_steps, 1), 1.0)) + 1) / 2
            ema(self.target_backbone, self.backbone, rate)
            ema(self.target_projector, self.projector, rate)

    class SwAV(Method):
        def __init__(self):
            super().__init__()
            self.prototypes = nn.Linear(projection_dim, prototypes, bias=False)
            self._normalize_prototypes()

        def _normalize_prototypes(self) -> None:
            with torch.no_grad():
                self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

        def forward(self, views):
            batch = views[0].shape[0]
            by_size: dict[int, list] = {}
            for view in views:  # one backbone pass per resolution
                by_size.setdefault(view.shape[-1], []).append(view)
            scores = []
            for group in by_size.values():
                z = F.normalize(self.projector(self.backbone(torch.cat(group))), dim=1)
                scores.extend(self.prototypes(z).split(batch))
            loss = 0.0
            for i in (0, 1):
                with torch.no_grad():
                    codes = sinkhorn(scores[i].detach().float())
                others = [j for j in range(len(scores)) if j != i]
                for j in others:
                    loss = loss - (codes * F.log_softmax(scores[j] / temperature, dim=1)).sum(dim=1).mean() / len(
                        others
                    )
            return loss / 2

        def before_step(self, step: int) -> None:
            if step <= freeze_prototype_steps:  # a frozen prototype layer lets the codes settle first
                self.prototypes.weight.grad = None

        def after_step(self, step: int) -> None:
            self._normalize_prototypes()

    classes = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL, "swav": SwAV}
    return classes[method]()


def sinkhorn(scores):
    """SwAV's equal-partition codes: ``(B, K)`` prototype scores → ``(B, K)`` soft assignments (rows sum to 1).

    Computed in the log domain: ``exp(score / 0.05)`` overflows or underflows for scores beyond ±1.
    """
    import torch

    log_q = (scores / SINKHORN_EPSILON).T  # (K, B)
    n_prototypes, batch = log_q.shape
    for _ in range(SINKHORN_ITERATIONS):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n_prototypes)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).T
