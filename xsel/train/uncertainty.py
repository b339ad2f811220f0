"""Selectors that read a classifier's predictions on the pool: the next round of active learning.

``uncertainty`` (entropy or margin) and ``boostmis`` (adversarial KL ∪ density-aware entropy). They run the
classifier head with torch, so they live on the workstation side; the built-in selector plugin registers them
through factories that import this module only when one is built.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from xsel.errors import InputError
from xsel.geometry import LARGE_POOL, PoolDistances, row_norms, subsample
from xsel.train.head import Classifier, load_classifier

DENSITY_NEIGHBOURS = 10  # boostmis: k of the pool's k-nearest-neighbour graph
DENSITY_REFERENCE = 2_000  # boostmis: pools above LARGE_POOL look up neighbours among a seeded sample this size
VAT_XI = 1e-3  # boostmis: size of the probe perturbation, × the pool's median embedding norm
VAT_EPSILON = 0.05  # boostmis: size of the adversarial perturbation, × the pool's median embedding norm
MODEL_BATCH = 4096  # rows per forward/backward pass of the classifier head
UNCERTAINTY_MEASURES = ("entropy", "margin")


def _classifier(model, selector: str) -> Classifier:
    """The classifier a model-based selector reads: a ``Classifier`` as is (active learning passes the
    round's in-memory probe), else a path to ``classifier.pt`` or its run folder."""
    if model is None:
        raise InputError(
            f"{selector} needs a trained classifier: add --model RUN_DIR/classifier.pt (from `xsel train classifier`)"
        )
    return model if isinstance(model, Classifier) else load_classifier(model)


def _ranking(scores: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Rows by descending score; exact ties in a seeded order, so a selection is a function of the seed."""
    tie_break = np.random.default_rng([seed, stream]).permutation(len(scores))
    return np.lexsort((tie_break, -scores))


def _rank_positions(scores: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """0 for the highest score, 1 for the next, …"""
    positions = np.empty(len(scores), dtype=np.int64)
    positions[_ranking(scores, seed, stream)] = np.arange(len(scores))
    return positions


class _ModelSelector:
    """Shared by the selectors that read a classifier's predictions on the pool (all labels, or ``label``)."""

    uses_labels = False
    name = "model"

    def __init__(self, model=None, label: str | None = None):
        self.classifier = _classifier(model, self.name)
        self.encoder_identity = self.classifier.encoder_identity
        self.columns = (
            list(range(len(self.classifier.labels))) if label is None else [self.classifier.label_index(label)]
        )

    def _head(self):
        """The head in float64, frozen: stable entropies and gradients (a linear head, so this is cheap)."""
        head = copy.deepcopy(self.classifier.head).double().eval()
        for parameter in head.parameters():
            parameter.requires_grad_(False)
        return head

    def _check_dimension(self, embeddings: np.ndarray) -> None:
        expected = self.classifier.head.linear.in_features
        if embeddings.shape[1] != expected:
            raise InputError(
                f"{self.classifier.path} reads {expected}-d embeddings, these are {embeddings.shape[1]}-d; "
                "embed with the classifier's encoder"
            )

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, len(columns)) float64 logits of the chosen labels, in batches of ``MODEL_BATCH`` rows. One input
        buffer and one output array: per-batch arrays left between the head's temporaries fragment the heap, and a
        million rows then held twice their own size."""
        self._check_dimension(embeddings)
        head = self._head()
        logits = np.empty((len(embeddings), len(self.columns)))
        buffer = np.empty((min(MODEL_BATCH, len(embeddings)), embeddings.shape[1]))
        with torch.no_grad():
            for start in range(0, len(embeddings), MODEL_BATCH):
                rows = min(MODEL_BATCH, len(embeddings) - start)
                buffer[:rows] = embeddings[start : start + rows]
                logits[start : start + rows] = head(torch.from_numpy(buffer[:rows]))[:, self.columns].numpy()
        return logits

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_scores(embeddings, k, seed=seed, metadata=metadata)[0]

    def select_with_scores(self, embeddings, k, *, seed, metadata=None):
        """Picks and every row's score from one pass (``xsel select`` reports both; the model runs once)."""
        scores = self.scores(embeddings, metadata, seed=seed)
        return _ranking(scores, seed, 6)[: min(k, len(embeddings))], scores


def binary_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in bits (0 … 1) of Bernoulli predictions given as logits, stable at large |logit|."""
    log_p, log_q = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)  # log σ(z), log(1 − σ(z))
    return -(np.exp(log_p) * log_p + np.exp(log_q) * log_q) / np.log(2.0)  # exp of a log ≤ 0 never overflows


class UncertaintySelector(_ModelSelector):
    """Uncertainty sampling: label what the classifier is least sure of.

    ``measure="entropy"``: mean binary entropy over the labels (bits); ``"margin"``: mean of
    1 − |2p − 1| (1 at p = 0.5, 0 at p ∈ {0, 1}). Top-k by score, exact ties in a seeded order.
    O(N·D·L); no neighbour search, so pools of any size are scored whole.
    """

    name = "uncertainty"

    def __init__(self, model=None, label: str | None = None, measure: str = "entropy"):
        if measure not in UNCERTAINTY_MEASURES:
            raise InputError(f"uncertainty measure {measure!r}: choose one of {', '.join(UNCERTAINTY_MEASURES)}")
        super().__init__(model, label)
        self.measure = measure

    def scores(self, embeddings, metadata=None, *, seed=0):
        logits = self.logits(embeddings)
        if self.measure == "margin":
            return (1.0 - np.abs(np.tanh(logits / 2.0))).mean(axis=1)  # |2σ(z) − 1| = |tanh(z/2)|
        return binary_entropy(logits).mean(axis=1)


def bernoulli_kl(logits_p, logits_q):
    """KL(Bern(σ(p)) ‖ Bern(σ(q))) per entry, from logits (torch tensors), stable in log space."""
    p = logits_p.sigmoid()
    return p * (F.logsigmoid(logits_p) - F.logsigmoid(logits_q)) + (1 - p) * (
        F.logsigmoid(-logits_p) - F.logsigmoid(-logits_q)
    )


class BoostMISSelector(_ModelSelector):
    """BoostMIS informative annotation (Zhang et al., CVPR 2022): adversarially unstable ∪ density-aware uncertain.

    Per pool embedding x, with f the classifier head (logits of the chosen labels) and s the pool's median
    embedding norm (so ξ and ε are relative sizes, the same for every row):

    1. Adversarial instability (VAT, Miyato et al. 2018), one power iteration:
       d ~ N(0, I) seeded, normalised;  g = ∇_r Σ_l KL(σ(f(x)_l) ‖ σ(f(x + r)_l)) at r = ξ·s·d;
       r_adv = ε·s·g/‖g‖;  a(x) = mean_l KL(σ(f(x)_l) ‖ σ(f(x + r_adv)_l)).
       Defaults ξ = 1e-3, ε = 0.05. For a linear head a(x) ≈ ½·p(1 − p)·(ε·s·‖w/σ‖)², largest at p = ½.
    2. Density-aware entropy: u(x) = H̄(x) · ρ(x), H̄ the mean binary entropy over the labels (bits) and
       ρ(x) = t(x) / max t, t(x) = 1 / (mean cosine distance from x to its 10 nearest pool neighbours + 1e-6):
       uncertain images in dense regions rank above uncertain outliers.
    3. Ranking, the union of both lists: with r_a, r_u each row's position when ranked by a and by u
       (descending), rows are taken by min(r_a, r_u), then max(r_a, r_u), then a seeded order, so the top K
       alternates between the two lists and never repeats a row. ``scores`` reports 1 − min(r_a, r_u)/N.

    The public BoostMIS code leaves the selection step incomplete; this is our reading of the paper. The
    neighbour search runs block by block (no N×N matrix) over the whole pool up to ``LARGE_POOL`` rows; above,
    neighbours are looked up among a seeded sample of ``DENSITY_REFERENCE`` rows (a coarser density, the same
    for every row). The VAT step runs in batches of ``MODEL_BATCH`` rows.
    """

    name = "boostmis"

    def __init__(
        self,
        model=None,
        label: str | None = None,
        xi: float = VAT_XI,
        epsilon: float = VAT_EPSILON,
        neighbours: int = DENSITY_NEIGHBOURS,
    ):
        if not (xi > 0 and epsilon > 0 and neighbours >= 1):
            raise InputError(f"boostmis needs xi > 0, epsilon > 0, neighbours ≥ 1 (got {xi}, {epsilon}, {neighbours})")
        super().__init__(model, label)
        self.xi, self.epsilon, self.neighbours = float(xi), float(epsilon), int(neighbours)

    def adversarial_kl(self, embeddings: np.ndarray, seed: int) -> np.ndarray:
        """a(x) of the docstring, (N,) float64 ≥ 0."""
        self._check_dimension(embeddings)
        head = self._head()
        scale = float(np.median(row_norms(embeddings))) if len(embeddings) else 1.0
        scale = scale if scale > 0 else 1.0
        rng = np.random.default_rng([seed, 5])
        result = np.zeros(len(embeddings))
        buffer = np.empty((min(MODEL_BATCH, len(embeddings)), embeddings.shape[1]))  # reused: see logits()
        noise = np.empty_like(buffer)
        for start in range(0, len(embeddings), MODEL_BATCH):
            rows = min(MODEL_BATCH, len(embeddings) - start)
            buffer[:rows] = embeddings[start : start + rows]
            rng.standard_normal(out=noise[:rows])
            x, d = torch.from_numpy(buffer[:rows]), torch.from_numpy(noise[:rows])
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            clean = head(x)[:, self.columns]
            probe = (self.xi * scale * d).requires_grad_(True)
            divergence = bernoulli_kl(clean, head(x + probe)[:, self.columns]).sum()
            (gradient,) = torch.autograd.grad(divergence, probe)
            direction = gradient / gradient.norm(dim=1, keepdim=True).clamp_min(1e-300)
            with torch.no_grad():
                adversarial = head(x + self.epsilon * scale * direction)[:, self.columns]
                result[start : start + rows] = bernoulli_kl(clean, adversarial).mean(dim=1).clamp_min(0).numpy()
        return result

    def density(self, embeddings: np.ndarray, seed: int) -> np.ndarray:
        """ρ(x) of the docstring, (N,) in (0, 1]; cosine neighbours found block by block (no N×N matrix, no
        normalised copy of the pool)."""
        pool = PoolDistances(embeddings, "cosine")
        n = len(pool)
        reference = subsample(n, seed, LARGE_POOL) if n <= LARGE_POOL else subsample(n, seed, DENSITY_REFERENCE)
        neighbours = min(self.neighbours, len(reference) - 1)
        if neighbours < 1:
            return np.ones(n)
        targets = pool.points(reference)
        mean_distance = np.empty(n)
        for start in range(0, n, 1024):
            block = np.arange(start, min(start + 1024, n))
            squared = pool.squared_to(targets, block)
            rows, columns = np.nonzero(reference[None, :] == block[:, None])
            squared[rows, columns] = np.inf  # a row is not its own neighbour
            nearest = np.partition(squared, neighbours - 1, axis=1)[:, :neighbours]
            mean_distance[block] = np.sqrt(nearest).mean(axis=1)
        typicality = 1.0 / (mean_distance + 1e-6)
        return typicality / typicality.max()

    def _positions(self, embeddings, seed):
        adversarial = self.adversarial_kl(embeddings, seed)
        uncertain = binary_entropy(self.logits(embeddings)).mean(axis=1) * self.density(embeddings, seed)
        return _rank_positions(adversarial, seed, 7), _rank_positions(uncertain, seed, 8)

    def scores(self, embeddings, metadata=None, *, seed=0):
        by_adversarial, by_uncertain = self._positions(embeddings, seed)
        return 1.0 - np.minimum(by_adversarial, by_uncertain) / max(len(embeddings), 1)

    def select_with_scores(self, embeddings, k, *, seed, metadata=None):
        """Picks and scores from one VAT + density pass (both come from the two rank positions)."""
        by_adversarial, by_uncertain = self._positions(embeddings, seed)
        first = np.minimum(by_adversarial, by_uncertain)
        tie_break = np.random.default_rng([seed, 6]).permutation(len(embeddings))
        order = np.lexsort((tie_break, np.maximum(by_adversarial, by_uncertain), first))
        return order[: min(k, len(embeddings))], 1.0 - first / max(len(embeddings), 1)
