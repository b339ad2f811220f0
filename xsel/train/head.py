"""Classifier checkpoints (``classifier.pt``) and the multi-label linear head that reads store embeddings.

A classifier is a linear head over an encoder's pooled features (the embeddings ``xsel embed`` stores):

    logits = ((embedding - input_mean) / input_scale) @ weight.T + bias        (N, D) → (N, L)

``classifier.pt`` (``torch.save``; loads with ``weights_only=True``):
  format            ``"xsel-classifier-1"``
  labels            the L label columns, in head order
  head              ``weight`` (L, D), ``bias`` (L,), ``input_mean`` (D,), ``input_scale`` (D,): float32 tensors
  encoder_identity  encoder, weights_sha256, preprocessing of the embedding space the head reads
  state_dict        the fine-tuned backbone (absent for a linear probe trained on a store), so that
                    ``xsel embed --encoder NAME --weights classifier.pt`` makes a store this head fits
  xsel              ``{"kind": "classifier", "encoder": NAME, "preprocessing": {...}}``: what ``embed`` reads
  thresholds        one decision threshold per label (on probabilities, chosen on validation)
  config            the training settings, for the record
Targets follow torchxrayvision's convention: (N, L) float with 1 positive, 0 negative, NaN unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xsel.errors import InputError
from xsel.train.checkpoints import read_checkpoint, save_torch_atomic
from xsel.train.runtime import one_cycle

CHECKPOINT_FORMAT = "xsel-classifier-1"
CHECKPOINT_NAME = "classifier.pt"
LOSSES = ("weighted-bce", "focal")
FOCAL_GAMMA = 2.0


class LinearHead(nn.Module):
    """Standardise, then one linear layer; the standardisation statistics are buffers so they travel with it."""

    def __init__(self, embedding_dim: int, num_labels: int, *, input_mean=None, input_scale=None):
        super().__init__()
        self.linear = nn.Linear(embedding_dim, num_labels)
        mean = torch.zeros(embedding_dim) if input_mean is None else torch.as_tensor(input_mean).float()
        scale = torch.ones(embedding_dim) if input_scale is None else torch.as_tensor(input_scale).float()
        self.register_buffer("input_mean", mean)
        self.register_buffer("input_scale", scale)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear((embeddings - self.input_mean) / self.input_scale)


def build_head(embedding_dim: int, num_labels: int, *, input_mean=None, input_scale=None) -> LinearHead:
    """A fresh linear head (identity standardisation unless statistics are given)."""
    return LinearHead(embedding_dim, num_labels, input_mean=input_mean, input_scale=input_scale)


def head_state(head: LinearHead) -> dict:
    """The checkpoint's ``head`` entry from a head module."""
    return {
        "weight": head.linear.weight.detach().cpu().float().clone(),
        "bias": head.linear.bias.detach().cpu().float().clone(),
        "input_mean": head.input_mean.detach().cpu().float().clone(),
        "input_scale": head.input_scale.detach().cpu().float().clone(),
    }


def label_weights(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label positive and negative weights from the training prevalence (known labels only).

    w₊ = N / (2·N₊), w₋ = N / (2·N₋): each class contributes half the loss of a label, whatever its prevalence.
    """
    known = ~np.isnan(targets)
    positives = np.nansum(targets, axis=0)
    counts = known.sum(axis=0)
    negatives = counts - positives
    pos_weight = counts / (2.0 * np.maximum(positives, 1.0))
    neg_weight = counts / (2.0 * np.maximum(negatives, 1.0))
    return pos_weight.astype(np.float32), neg_weight.astype(np.float32)


def multilabel_loss(logits, targets, *, loss: str, pos_weight, neg_weight):
    """Mean loss over the known entries of ``targets`` (NaN = unknown, ignored).

    ``weighted-bce``: BCE with w₊ on positives and w₋ on negatives. ``focal``: the same weights times
    (1 − p_t)^γ with γ = 2 (Lin et al. 2017), which down-weights easy examples.
    """
    if loss not in LOSSES:
        raise InputError(f"--loss {loss}: choose one of {', '.join(LOSSES)}")
    known = ~torch.isnan(targets)
    target = torch.where(known, targets, torch.zeros_like(targets))
    weights = torch.where(target > 0.5, pos_weight, neg_weight) * known
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    if loss == "focal":
        p_t = torch.exp(-per_entry)
        per_entry = (1.0 - p_t) ** FOCAL_GAMMA * per_entry
    return (per_entry * weights).sum() / known.sum().clamp(min=1)


def fit_linear_head(
    embeddings: np.ndarray,
    targets: np.ndarray,
    *,
    loss: str = "weighted-bce",
    epochs: int = 200,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> LinearHead:
    """Train a linear head on embeddings (full batch, AdamW + OneCycle): the CPU-friendly linear probe.

    ``embeddings`` (N, D) float32, ``targets`` (N, L) with 1/0/NaN. Inputs are standardised with the
    statistics of these embeddings (kept in the head). Returns the head module in eval mode.
    """
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    mean = x.mean(dim=0)
    scale = x.std(dim=0, unbiased=False).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(x.shape[1], y.shape[1], input_mean=mean, input_scale=scale)
    pos_weight, neg_weight = (torch.as_tensor(w) for w in label_weights(targets))
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = one_cycle(optimizer, learning_rate, max(epochs, 1))
    head.train()
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        value = multilabel_loss(head(x), y, loss=loss, pos_weight=pos_weight, neg_weight=neg_weight)
        value.backward()
        optimizer.step()
        schedule.step()
    return head.eval()


@dataclass
class Classifier:
    """A loaded ``classifier.pt``: the head plus what it was trained on."""

    path: Path
    labels: list[str]
    head: LinearHead  # eval mode
    encoder_identity: dict
    thresholds: list[float]
    config: dict = field(default_factory=dict)
    backbone_state: dict | None = None

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Sigmoid outputs (N, L) float64 for store embeddings."""
        if embeddings.shape[1] != self.head.linear.in_features:
            raise InputError(
                f"{self.path} reads {self.head.linear.in_features}-d embeddings, these are {embeddings.shape[1]}-d; "
                "embed with the classifier's encoder"
            )
        with torch.inference_mode():
            logits = self.head(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))
        return torch.sigmoid(logits.double()).numpy()

    def label_index(self, label: str) -> int:
        """Column of ``label`` in the head; an unknown label lists the known ones."""
        if label not in self.labels:
            raise InputError(f"--label {label!r}: {self.path} was trained on {', '.join(self.labels)}")
        return self.labels.index(label)


def save_classifier(
    path: str | Path,
    *,
    head: LinearHead,
    labels: list[str],
    encoder_identity: dict,
    thresholds: list[float],
    config: dict,
    backbone_state: dict | None = None,
) -> Path:
    """Write ``classifier.pt`` atomically (temporary file + rename)."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "labels": list(labels),
        "head": head_state(head),
        "encoder_identity": encoder_identity,
        "xsel": {
            "kind": "classifier",
            "encoder": encoder_identity.get("encoder"),
            "preprocessing": encoder_identity.get("preprocessing"),
        },
        "thresholds": [float(t) for t in thresholds],
        "config": config,
    }
    if backbone_state is not None:
        payload["state_dict"] = {k: v.detach().cpu() for k, v in backbone_state.items()}
    return save_torch_atomic(payload, path)


def load_classifier(path: str | Path) -> Classifier:
    """Read a ``classifier.pt`` (or a run folder holding one) safely; a wrong file is a one-line InputError."""
    path, payload = read_checkpoint(
        path,
        file_format=CHECKPOINT_FORMAT,
        kind="classifier",
        made_by="xsel train classifier",
        default_name=CHECKPOINT_NAME,
    )
    state = payload["head"]
    labels = list(payload["labels"])
    head = build_head(state["weight"].shape[1], len(labels))
    head.load_state_dict(
        {
            "linear.weight": state["weight"],
            "linear.bias": state["bias"],
            "input_mean": state["input_mean"],
            "input_scale": state["input_scale"],
        }
    )
    return Classifier(
        path=path,
        labels=labels,
        head=head.eval(),
        encoder_identity=payload["encoder_identity"],
        thresholds=list(payload.get("thresholds", [0.5] * len(labels))),
        config=payload.get("config", {}),
        backbone_state=payload.get("state_dict"),
    )
