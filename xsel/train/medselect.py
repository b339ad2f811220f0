"""The learned selectors: MedSelect (a bidirectional LSTM that scores every image of a pool, the paper's
reproduction) and the set selector (:mod:`xsel.train.setselect`); their settings, checkpoints and plugin classes.

Pool order: an LSTM reads the pool as a sequence, so xsel always presents a pool in store order (rows
ascending), in training, evaluation, ``xsel select`` and the exported bundle; the same pool therefore
always gets the same scores. Selection at inference is the deterministic top-k of the scores.

Inputs per image: the embedding, L2-normalised and scaled by √D (components of order 1), minus the
pool's mean of those vectors (what makes an image typical or unusual *in this pool*); with
``use_metadata`` three more features, each 0 when unknown: sex (+1 M, −1 F), age z-scored with the
training store's mean and standard deviation, and frontal view (+1 PA/AP, −1 lateral).

Checkpoints (``selector.pt``) hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from xsel.errors import InputError
from xsel.selectors import METADATA_FEATURES, PoolFeatures
from xsel.train.checkpoints import gate_from_payload, read_checkpoint, save_torch_atomic
from xsel.train.setselect import LARGE_POOL_ROWS, SetPolicy

CHECKPOINT_FORMAT = 1


@dataclass
class SelectorConfig:
    """Everything a training run was configured with; saved in every checkpoint."""

    conditions: list[str]
    val_conditions: list[str]
    negative: str = "No Finding"
    uncertain: str = "positive"
    k: int = 20
    pool_size: int = 1000
    query_size: int = 100
    episodes: int = 20_000
    batch_size: int = 16
    classifier: str = "cosine"
    use_metadata: bool = False
    model: str = "lstm"  # "lstm" (MedSelect) or "set" (order-free, sequential picks)
    hidden: int = 0  # 0: the model's default (MODEL_DEFAULTS)
    learning_rate: float = 0.0  # 0: the model's default
    samples: int = 4  # set model: sequences sampled per episode; each one's baseline is the others' mean reward
    balanced: float = 0.0  # share of training steps whose pools are half positive (else natural prevalence)
    episodes_within: str = ""  # a column (e.g. Source): a condition's episodes stay within values that label it
    read_embedding: bool = True  # set model: read the embedding itself besides the pool-relative features
    teacher: str = ""  # set model: a trained selector.pt whose picks it imitates (distillation) instead of REINFORCE
    teacher_sha256: str = ""  # the teacher file's digest when the run began: a resumed run must find the same file
    decay_at: float = 0.6  # fraction of the episodes after which the learning rate drops ×0.1
    average_steps: int | None = (
        None  # ship weights averaged over this many recent steps; 0: the best step; None: model's
    )
    val_every: int = 50  # training steps between validations
    val_episodes: int = 20  # fixed validation episodes per validation condition
    val_fraction: float = 0.2  # share of patients held out for validation
    max_minutes: float = 10.0
    seed: int = 0
    age_mean: float = 0.0
    age_std: float = 1.0
    extra: dict = field(default_factory=dict)


MODEL_DEFAULTS = {
    "lstm": {"hidden": 256, "learning_rate": 1e-4, "average_steps": 0},
    "set": {"hidden": 64, "learning_rate": 3e-4, "average_steps": 1000},  # BENCHMARKS.md §13: stable across steps
}


def with_model_defaults(config: SelectorConfig) -> SelectorConfig:
    """The config with its model's hidden width and learning rate wherever they were left at 0, and its weight
    averaging where that was left at None."""
    if config.model not in MODEL_DEFAULTS:
        raise InputError(f"--model {config.model}: choose {' or '.join(MODEL_DEFAULTS)}")
    defaults = MODEL_DEFAULTS[config.model]
    config.hidden = config.hidden or defaults["hidden"]
    config.learning_rate = config.learning_rate or defaults["learning_rate"]
    if config.average_steps is None:
        config.average_steps = defaults["average_steps"]
    return config


def build_policy(config: SelectorConfig, embedding_dim: int):
    """The network a config names: the MedSelect scorer or the set policy."""
    metadata = len(METADATA_FEATURES) if config.use_metadata else 0
    if config.model == "set":
        return SetPolicy(embedding_dim, hidden=config.hidden, metadata=metadata, read_embedding=config.read_embedding)
    return MedSelectScorer(embedding_dim, hidden=config.hidden, use_metadata=config.use_metadata)


class MedSelectScorer(nn.Module):
    """The exportable module: ``(B, N, D′)`` float32 → ``(B, N)`` logits, D′ = D (+3 with metadata)."""

    def __init__(self, embedding_dim: int, *, hidden: int = 256, use_metadata: bool = False):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_dim = embedding_dim + (len(METADATA_FEATURES) if use_metadata else 0)
        self.lstm = nn.LSTM(self.input_dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, pool: torch.Tensor) -> torch.Tensor:
        scaled = self._scaled(pool)
        features = torch.cat([scaled - scaled.mean(dim=1, keepdim=True), pool[..., self.embedding_dim :]], dim=-1)
        hidden_states, _ = self.lstm(features)
        return self.head(hidden_states).squeeze(-1)

    def _scaled(self, pool: torch.Tensor) -> torch.Tensor:
        embeddings = pool[..., : self.embedding_dim]
        return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(self.embedding_dim)

    def forward_in_chunks(self, pool: torch.Tensor, chunk: int) -> torch.Tensor:
        """:meth:`forward` of one long pool ``(N, D′)`` → ``(N,)``, ``chunk`` rows at a time: each direction of the
        LSTM carries its state from chunk to chunk, so the numbers are forward's, without its (N, 8·hidden) gate
        buffers and feature copies (a million-image pool needs tens of GB in one piece)."""
        n, width = pool.shape[0], self.lstm.hidden_size
        mean = sum(self._scaled(pool[s : s + chunk]).sum(dim=0) for s in range(0, n, chunk)) / max(n, 1)

        def features(start: int) -> torch.Tensor:
            rows = pool[start : start + chunk]
            return torch.cat([self._scaled(rows) - mean, rows[:, self.embedding_dim :]], dim=-1)[None]

        weight = self.head.weight[0]
        scores = torch.full((n,), float(self.head.bias[0]))
        for direction, starts, flip in ((0, range(0, n, chunk), False), (1, range(0, n, chunk)[::-1], True)):
            lstm, state = self._one_direction(direction), None
            for start in starts:
                rows = features(start).flip(1) if flip else features(start)
                hidden_states, state = lstm(rows, state)
                hidden_states = hidden_states[0].flip(0) if flip else hidden_states[0]
                scores[start : start + len(hidden_states)] += (
                    hidden_states @ weight[direction * width : (direction + 1) * width]
                )
        return scores

    def _one_direction(self, direction: int) -> nn.LSTM:
        """A one-way LSTM holding the forward (0) or backward (1) weights of ``self.lstm``."""
        with torch.random.fork_rng(devices=[]):  # its random initialisation must not move torch's global generator
            lstm = nn.LSTM(self.input_dim, self.lstm.hidden_size, batch_first=True)
        suffix = "_reverse" if direction else ""
        lstm.load_state_dict({name: getattr(self.lstm, f"{name}{suffix}") for name, _ in lstm.named_parameters()})
        return lstm


def pool_features(config: SelectorConfig) -> PoolFeatures:
    """What the scorer reads besides the embedding: the three metadata features with ``use_metadata``."""
    return PoolFeatures(
        metadata=METADATA_FEATURES if config.use_metadata else (), age_mean=config.age_mean, age_std=config.age_std
    )


def save_checkpoint(path: Path, *, scorer, config: SelectorConfig, identity: dict, extra: dict) -> None:
    """Write ``selector.pt`` atomically (temporary file + rename)."""

    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": scorer.state_dict(),
        "config": asdict(config),
        "embedding_dim": scorer.embedding_dim,
        "encoder_identity": identity,
        **extra,
    }
    save_torch_atomic(payload, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a ``selector.pt`` safely (``weights_only=True``); a wrong file is a one-line InputError."""
    path, payload = read_checkpoint(
        path, file_format=CHECKPOINT_FORMAT, kind="selector", made_by="xsel train selector", default_name="selector.pt"
    )
    payload["path"] = str(path)
    return payload


def load_selector_checkpoint(path: str | Path, *, model: str | None = None) -> tuple[dict, SelectorConfig]:
    """A checkpoint and its config, refused (one line) when ``model`` is given and it holds the other kind."""
    payload = load_checkpoint(path)
    known = set(SelectorConfig.__dataclass_fields__)
    config = SelectorConfig(**{k: v for k, v in payload["config"].items() if k in known})
    if model is not None and config.model != model:
        plugin = learned_plugin(path)
        raise InputError(
            f"{payload['path']} holds a {config.model} selector: run it as {plugin} "
            f"(--selector {plugin}, or {plugin}={payload['path']} in --selectors)"
        )
    return payload, with_model_defaults(config)


def learned_plugin(checkpoint: str | Path) -> str:
    """The selector plugin that runs a checkpoint of ``xsel train selector``: medselect (LSTM) or setselect."""
    return PLUGINS.get(load_checkpoint(checkpoint)["config"].get("model", "lstm"), "medselect")


class _LearnedSelector:
    """A trained checkpoint as a selector plugin: its network, encoder identity and input features."""

    uses_labels = False
    model = ""
    plugin = ""

    def __init__(self, checkpoint: str | Path | None = None):
        if checkpoint is None:
            raise InputError(f"{self.plugin} needs a trained checkpoint: {self.plugin}=RUN_DIR/selector.pt")
        payload, self.config = load_selector_checkpoint(checkpoint, model=self.model)
        self.name = self.plugin
        self.network = build_policy(self.config, payload["embedding_dim"])
        self.network.load_state_dict(payload["state_dict"])
        self.network.eval()
        self.encoder_identity = payload["encoder_identity"]
        self.checkpoint = payload["path"]
        self.pool_features = pool_features(self.config)
        self.trust_gate = gate_from_payload(payload)  # None for checkpoints trained without one

    def export_details(self) -> dict:
        """What a bundle's manifest records about this selector besides its features."""
        return {"model": self.config.model, "trained_k": int(self.config.k), "conditions": list(self.config.conditions)}

    def _inputs(self, embeddings: np.ndarray, metadata: pd.DataFrame | None) -> torch.Tensor:
        if embeddings.shape[1] != self.network.embedding_dim:
            raise InputError(
                f"{self.checkpoint} was trained on {self.network.embedding_dim}-d embeddings, "
                f"this store has {embeddings.shape[1]}-d"
            )
        return torch.from_numpy(self.pool_features.inputs(np.asarray(embeddings, dtype=np.float32), metadata))[None]

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_scores(embeddings, k, seed=seed, metadata=metadata)[0]


class MedSelectSelector(_LearnedSelector):
    """MedSelect over a trained checkpoint: scores the pool, returns the top-k in score order."""

    model, plugin = "lstm", "medselect"

    def scorer(self):
        """The torch module of the plugin contract: (1, N, D′) → (1, N) scores."""
        return self.network

    def scores(self, embeddings: np.ndarray, metadata: pd.DataFrame | None = None) -> np.ndarray:
        """One score per pool row (rows in the order given: xsel passes store order)."""
        with torch.inference_mode():
            inputs = self._inputs(embeddings, metadata)
            if inputs.shape[1] > LARGE_POOL_ROWS:  # chunk by chunk, each LSTM direction carrying its state
                return self.network.forward_in_chunks(inputs[0], LARGE_POOL_ROWS).numpy()
            return self.network(inputs)[0].numpy()

    def select_with_scores(self, embeddings, k, *, seed, metadata=None):
        """The deterministic top-k and every row's score from one pass of the scorer."""
        scores = self.scores(embeddings, metadata)
        return np.argsort(-scores, kind="stable")[: min(k, len(scores))], scores


class SetSelector(_LearnedSelector):
    """The set selector over a trained checkpoint: K sequential picks, the same for any row order."""

    model, plugin = "set", "setselect"

    def policy(self):
        """The torch module of the sequential contract: ``(1, N, D′), K → (1, N) scores, (1, K) picks``."""
        return self.network

    def select_with_scores(self, embeddings, k, *, seed, metadata=None):
        """K sequential picks and each row's logit (at its pick, or at the last step) from one run of the policy."""
        with torch.no_grad():  # not inference_mode: TorchScript export reuses this module
            inputs = self._inputs(embeddings, metadata)
            if inputs.shape[1] > LARGE_POOL_ROWS:
                scores, picks = self.network.forward_in_chunks(inputs[0], k)
                return picks.numpy(), scores.numpy()
            scores, picks = self.network(inputs, torch.tensor(k))
        return picks[0].numpy(), scores[0].numpy()


PLUGINS = {selector.model: selector.plugin for selector in (MedSelectSelector, SetSelector)}  # plugin of each model
