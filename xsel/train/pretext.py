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
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

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


def augment(gray: torch.Tensor, crop: Crop, rng: np.random.Generator) -> torch.Tensor:
    """One random view of a gray image ``(1, H, W)`` float tensor in [0, 1] → ``(1, S, S)`` in [0, 1].

    Small rotation, random resized crop, brightness/contrast jitter, Gaussian blur. No horizontal flip
    (it swaps the heart's side) and no colour jitter (there is no colour).
    """
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    image = TF.rotate(gray, angle, interpolation=TF.InterpolationMode.BILINEAR)
    height, width = image.shape[-2:]
    top, left, crop_h, crop_w = _crop_box(height, width, crop.scale, rng)
    image = TF.resized_crop(image, top, left, crop_h, crop_w, [crop.size, crop.size], antialias=True)
    if rng.random() < JITTER_PROBABILITY:
        brightness = float(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS))
        contrast = float(rng.uniform(1 - CONTRAST, 1 + CONTRAST))
        mean = image.mean()
        image = ((image - mean) * contrast + mean) * brightness
    if rng.random() < BLUR_PROBABILITY:
        sigma = float(rng.uniform(*BLUR_SIGMA)) * crop.size / 224
        kernel = max(3, int(2 * math.ceil(3 * sigma) + 1))
        image = TF.gaussian_blur(image, [kernel, kernel], [max(sigma, 1e-3)] * 2)
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


def normalize(views: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Gray views in [0, 1] → the encoder's input: replicated to its channels, mean/std normalised."""
    channels = int(preprocessing["channels"])
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(-1, 1, 1)
    return (views.expand(*views.shape[:-3], channels, *views.shape[-2:]) - mean) / std


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The MLP every method puts on the pooled features (and BYOL again as its predictor): Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def ema(target: nn.Module, online: nn.Module, rate: float) -> None:
    """Move ``target``'s weights towards ``online``'s (``rate`` of the old kept); buffers (BN statistics) copied."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters(), strict=True):
            t.mul_(rate).add_(o.detach(), alpha=1 - rate)
        for t, o in zip(target.buffers(), online.buffers(), strict=True):
            t.copy_(o)


class PretextMethod(nn.Module):
    """A backbone with a projection head; subclasses turn views into a loss. The training loop calls
    ``before_step`` between backward and the optimizer step and ``after_step`` after it (``step`` counts from 1)."""

    def __init__(self, backbone: nn.Module, projection_dim: int):
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.embedding_dim)
        self.projector = projection_head(dim, max(dim, 512), projection_dim)

    def before_step(self, step: int) -> None:
        """Nothing by default; SwAV drops the prototypes' gradient while they are frozen."""

    def after_step(self, step: int) -> None:
        """Nothing by default; momentum methods update their targets, SwAV renormalises its prototypes."""


class SimCLR(PretextMethod):
    """NT-Xent: each view's positive is the other view of its image, the remaining 2B−2 views are negatives."""

    def __init__(self, backbone: nn.Module, projection_dim: int, temperature: float):
        super().__init__(backbone, projection_dim)
        self.temperature = temperature

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        first, second = views[:2]
        z = F.normalize(self.projector(self.backbone(torch.cat([first, second]))), dim=1)
        n = first.shape[0]
        logits = z @ z.T / self.temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)


class MoCo(PretextMethod):
    """MoCo v2: queries from the trained network, keys from its momentum copy, past keys queued as negatives.

    The queue starts as random unit vectors from a fixed generator, so it does not depend on the run's seed."""

    def __init__(self, backbone: nn.Module, projection_dim: int, temperature: float, queue_size: int, momentum: float):
        super().__init__(backbone, projection_dim)
        self.temperature, self.momentum = temperature, momentum
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim, generator=generator), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        query, key_view = views[:2]
        q = F.normalize(self.projector(self.backbone(query)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_projector(self.key_backbone(key_view)), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ self.queue.clone().T
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._enqueue(k.detach().float())
        return loss

    def _enqueue(self, keys: torch.Tensor) -> None:
        start, size = int(self.queue_pointer), len(self.queue)
        index = (torch.arange(len(keys), device=keys.device) + start) % size
        self.queue[index] = keys
        self.queue_pointer.fill_((start + len(keys)) % size)

    def after_step(self, step: int) -> None:
        ema(self.key_backbone, self.backbone, self.momentum)
        ema(self.key_projector, self.projector, self.momentum)


class BYOL(PretextMethod):
    """BYOL: a predictor on the online projection regresses the EMA target's projection of the other view."""

    def __init__(self, backbone: nn.Module, projection_dim: int, momentum: float, total_steps: int):
        super().__init__(backbone, projection_dim)
        self.momentum, self.total_steps = momentum, total_steps
        dim = int(backbone.embedding_dim)
        self.predictor = projection_head(projection_dim, max(dim, 512), projection_dim)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        first, second = views[:2]
        both = torch.cat([first, second])
        online = F.normalize(self.predictor(self.projector(self.backbone(both))), dim=1)
        with torch.no_grad():
            target = F.normalize(self.target_projector(self.target_backbone(both)), dim=1)
        n = first.shape[0]
        swapped = torch.cat([target[n:], target[:n]])
        return (2 - 2 * (online * swapped).sum(dim=1)).mean()

    def after_step(self, step: int) -> None:
        progress = min(step / max(self.total_steps, 1), 1.0)
        rate = 1 - (1 - self.momentum) * (math.cos(math.pi * progress) + 1) / 2
        ema(self.target_backbone, self.backbone, rate)
        ema(self.target_projector, self.projector, rate)


class SwAV(PretextMethod):
    """SwAV: Sinkhorn codes of each global crop are predicted from every other crop's prototype scores."""

    def __init__(
        self, backbone: nn.Module, projection_dim: int, temperature: float, prototypes: int, freeze_steps: int
    ):
        super().__init__(backbone, projection_dim)
        self.temperature, self.freeze_steps = temperature, freeze_steps
        self.prototypes = nn.Linear(projection_dim, prototypes, bias=False)
        self._normalize_prototypes()

    def _normalize_prototypes(self) -> None:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
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
                cross_entropy = (codes * F.log_softmax(scores[j] / self.temperature, dim=1)).sum(dim=1).mean()
                loss = loss - cross_entropy / len(others)
        return loss / 2

    def before_step(self, step: int) -> None:
        if step <= self.freeze_steps:  # a frozen prototype layer lets the codes settle first
            self.prototypes.weight.grad = None

    def after_step(self, step: int) -> None:
        self._normalize_prototypes()


def build_method(
    method: str,
    backbone: nn.Module,
    *,
    projection_dim: int = 128,
    temperature: float | None = None,
    queue_size: int = 4096,
    momentum: float = 0.99,
    prototypes: int = 100,
    total_steps: int = 1,
    freeze_prototype_steps: int = 0,
) -> PretextMethod:
    """The training module of ``method`` around ``backbone``; ``module(views)`` returns the loss and
    ``module.after_step(step)`` does the per-step bookkeeping (EMA targets, prototype normalisation)."""
    if method not in METHODS:
        raise InputError(f"--method {method}: choose one of {', '.join(METHODS)}")
    temperature = TEMPERATURES[method] if temperature is None else temperature
    if method == "moco":
        return MoCo(backbone, projection_dim, temperature, queue_size, momentum)
    if method == "byol":
        return BYOL(backbone, projection_dim, momentum, total_steps)
    if method == "swav":
        return SwAV(backbone, projection_dim, temperature, prototypes, freeze_prototype_steps)
    return SimCLR(backbone, projection_dim, temperature)


def sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    """SwAV's equal-partition codes: ``(B, K)`` prototype scores → ``(B, K)`` soft assignments (rows sum to 1).

    Computed in the log domain: ``exp(score / 0.05)`` overflows or underflows for scores beyond ±1.
    """
    log_q = (scores / SINKHORN_EPSILON).T  # (K, B)
    n_prototypes, batch = log_q.shape
    for _ in range(SINKHORN_ITERATIONS):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n_prototypes)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).T
