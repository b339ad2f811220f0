"""Built-in selectors: cold start (random, kmedoids, kcenter, typiclust, probcover, oracle-balanced) and,
once a classifier exists, the next round of active learning (uncertainty, boostmis).

Each ``select(embeddings (N, D) float32, k, *, seed, metadata)`` returns ``min(k, N)`` distinct row
indices in priority order and is a function of its inputs and seed. Geometry is cosine: embeddings
are L2-normalised first, as the few-shot classifiers compare them by cosine similarity. No selector
builds an N×N matrix; where a pool is larger than ``LARGE_POOL`` the docstring says what is sampled.
Torch is imported only by the model-based selectors, so the site runtime never needs it.
"""

from __future__ import annotations

import numpy as np

from xsel import hookimpl
from xsel.classifier import Classifier, load_classifier
from xsel.errors import InputError
from xsel.geometry import squared_distances, unit_rows
from xsel.medselect import MedSelectSelector

LARGE_POOL = 10_000  # above this, kmedoids / probcover work on a seeded subsample of this size
TYPICALITY_NEIGHBOURS = 20
TYPICALITY_REFERENCE = 2_000  # typicality is measured against at most this many members of a cluster
PURITY = 0.95
PURITY_SAMPLE = 5_000  # probcover estimates ball purity on at most this many balls
LABEL_COLUMN = "label"  # episode labels (1/0) that evaluation passes to selectors with uses_labels
DENSITY_NEIGHBOURS = 10  # boostmis: k of the pool's k-nearest-neighbour graph
DENSITY_REFERENCE = 2_000  # boostmis: pools above LARGE_POOL look up neighbours among a seeded sample this size
VAT_XI = 1e-3  # boostmis: size of the probe perturbation, × the pool's median embedding norm
VAT_EPSILON = 0.05  # boostmis: size of the adversarial perturbation, × the pool's median embedding norm
MODEL_BATCH = 4096  # rows per forward/backward pass of the classifier head
UNCERTAINTY_MEASURES = ("entropy", "margin")


def _subsample(n: int, seed: int, limit: int = LARGE_POOL) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, limit, replace=False))


def kmeans_labels(points: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster of each row: float64 k-means++ (its float32 init is ~6× slower here); large pools use
    float32 mini-batch k-means, which is faster and needs half the memory."""
    import warnings

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # duplicate points: fewer clusters, handled
    if len(points) > LARGE_POOL:
        return MiniBatchKMeans(n_clusters, batch_size=4096, n_init=3, random_state=seed).fit_predict(points)
    return KMeans(n_clusters, n_init=1, random_state=seed).fit_predict(points.astype(np.float64))


class RandomSelector:
    """Uniformly random picks: the baseline every other selector is compared with."""

    uses_labels = False

    def select(self, embeddings, k, *, seed, metadata=None):
        return np.random.default_rng(seed).permutation(len(embeddings))[: min(k, len(embeddings))]


class KCenterSelector:
    """Greedy k-center (core-set): start at the point nearest the mean, then repeatedly take the point
    farthest from everything picked so far. O(N·D) per pick."""

    uses_labels = False

    def select(self, embeddings, k, *, seed, metadata=None):
        points = unit_rows(embeddings)
        k = min(k, len(points))
        centre = points.mean(axis=0, keepdims=True)
        first = int(np.argmin(squared_distances(points, centre)[:, 0]))
        picks = [first]
        nearest = squared_distances(points, points[first : first + 1])[:, 0]
        for _ in range(k - 1):
            nearest[picks[-1]] = -1.0
            pick = int(np.argmax(nearest))
            picks.append(pick)
            nearest = np.minimum(nearest, squared_distances(points, points[pick : pick + 1])[:, 0])
        return np.asarray(picks, dtype=np.int64)


class KMedoidsSelector:
    """MedSelect's clustering baseline: k-medoids (k-medoids++ seeding, alternating updates), label the
    medoids, largest cluster first. Pools above ``LARGE_POOL`` are clustered on a seeded subsample;
    a medoid update over a cluster larger than 2,000 considers the 500 members nearest its mean."""

    uses_labels = False
    max_iterations = 20

    def select(self, embeddings, k, *, seed, metadata=None):
        rows = _subsample(len(embeddings), seed)
        points = unit_rows(embeddings[rows])
        k = min(k, len(points))
        rng = np.random.default_rng(seed)
        medoids = [int(rng.integers(len(points)))]
        nearest = squared_distances(points, points[medoids])[:, 0]
        for _ in range(k - 1):  # k-medoids++: next medoid drawn with probability ∝ squared distance
            weights = nearest / nearest.sum() if nearest.sum() > 0 else None
            candidate = int(rng.choice(len(points), p=weights))
            if candidate in medoids:
                candidate = int(next(i for i in rng.permutation(len(points)) if i not in medoids))
            medoids.append(candidate)
            nearest = np.minimum(nearest, squared_distances(points, points[candidate : candidate + 1])[:, 0])
        medoids = np.asarray(medoids)
        for _ in range(self.max_iterations):
            assignment = np.argmin(squared_distances(points, points[medoids]), axis=1)
            updated = medoids.copy()
            for cluster in range(k):
                members = np.flatnonzero(assignment == cluster)
                if len(members) == 0:
                    continue
                candidates = members
                if len(members) > 2_000:
                    mean = points[members].mean(axis=0, keepdims=True)
                    candidates = members[np.argsort(squared_distances(points[members], mean)[:, 0])[:500]]
                cost = np.sqrt(squared_distances(points[candidates], points[members])).sum(axis=1)
                updated[cluster] = candidates[int(np.argmin(cost))]
            if np.array_equal(updated, medoids):
                break
            medoids = updated
        medoids = self._distinct(points, medoids)
        assignment = np.argmin(squared_distances(points, points[medoids]), axis=1)
        sizes = np.bincount(assignment, minlength=k)
        order = np.argsort(-sizes, kind="stable")
        return rows[medoids[order]]

    @staticmethod
    def _distinct(points, medoids):
        """Two clusters can share a medoid on duplicate points: replace repeats by the farthest unused point."""
        unique = list(dict.fromkeys(medoids.tolist()))
        while len(unique) < len(medoids):
            nearest = squared_distances(points, points[unique]).min(axis=1)
            nearest[unique] = -1.0
            unique.append(int(np.argmax(nearest)))
        return np.asarray(unique)


class TypiClustSelector:
    """TypiClust (Hacohen et al. 2022): k-means into min(K, N) clusters; from each cluster, largest first,
    take its most typical point, typicality = 1 / mean distance to its 20 nearest neighbours in the cluster.
    Clusters above ``TYPICALITY_REFERENCE`` members measure typicality against a seeded sample of that size."""

    uses_labels = False

    def select(self, embeddings, k, *, seed, metadata=None):
        points = unit_rows(embeddings)
        k = min(k, len(points))
        assignment = kmeans_labels(points, k, seed)
        rng = np.random.default_rng([seed, 2])
        sizes = np.bincount(assignment, minlength=k)
        ranked = []  # per cluster, largest first: members from most to least typical
        for cluster in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero(assignment == cluster)
            if len(members):
                ranked.append(members[np.argsort(-self._typicality(points, members, rng), kind="stable")])
        # one point per cluster; only when k-means found fewer clusters than K (duplicate points)
        # does a second round take each cluster's next most typical point
        picks = [
            int(members[depth]) for depth in range(max(map(len, ranked))) for members in ranked if depth < len(members)
        ]
        return np.asarray(picks[:k], dtype=np.int64)

    @staticmethod
    def _typicality(points, members, rng):
        if len(members) == 1:
            return np.ones(1)
        reference = members
        if len(members) > TYPICALITY_REFERENCE:
            reference = np.sort(rng.choice(members, TYPICALITY_REFERENCE, replace=False))
        similarity = points[members] @ points[reference].T
        position = np.minimum(np.searchsorted(reference, members), len(reference) - 1)
        is_self = reference[position] == members  # a member is not its own neighbour
        similarity[np.flatnonzero(is_self), position[is_self]] = -np.inf
        neighbours = min(TYPICALITY_NEIGHBOURS, len(reference) - 1)
        nearest = np.partition(similarity, -neighbours, axis=1)[:, -neighbours:]  # highest cosine = nearest
        return 1.0 / (np.sqrt(np.maximum(2.0 - 2.0 * nearest, 0.0)).mean(axis=1) + 1e-12)


class ProbCoverSelector:
    """ProbCover (Yehuda et al. 2022): greedy maximum coverage of δ-balls.

    δ is the largest radius at which 95% of balls are pure with respect to a k-means clustering into
    min(K, N) clusters. A ball around x is pure iff δ is below x's distance to the nearest point of
    another cluster, so δ is the 5th percentile of those distances: exact, no grid to search. Once
    everything is covered, the remaining picks are the uncovered-gain ties broken by a seeded order.
    Pools above ``LARGE_POOL`` are covered on a seeded subsample.
    """

    uses_labels = False

    def select(self, embeddings, k, *, seed, metadata=None):
        rows = _subsample(len(embeddings), seed)
        points = unit_rows(embeddings[rows])
        n, k = len(points), min(k, len(points))
        delta = self.radius(points, kmeans_labels(points, k, seed), seed) if k > 1 else 0.0
        graph = self.ball_graph(points, delta)
        gain = np.asarray(graph.sum(axis=1)).ravel().astype(np.int64)
        covered = np.zeros(n, dtype=bool)
        tie_break = np.random.default_rng([seed, 3]).permutation(n)
        picks = []
        for _ in range(k):
            order = np.lexsort((tie_break, -gain))  # largest gain first, seeded tie-break
            pick = next(i for i in order if i not in picks)
            picks.append(int(pick))
            newly = graph.indices[graph.indptr[pick] : graph.indptr[pick + 1]]
            newly = newly[~covered[newly]]
            covered[newly] = True
            if len(newly):
                gain -= np.asarray(graph[newly].sum(axis=0)).ravel().astype(np.int64)  # symmetric graph
            gain[picks[-1]] = -1
        return rows[np.asarray(picks, dtype=np.int64)]

    @staticmethod
    def radius(points: np.ndarray, clusters: np.ndarray, seed: int = 0) -> float:
        """Largest δ with purity ≥ 0.95: the 5th percentile of each point's distance to another cluster.

        Exact up to ``PURITY_SAMPLE`` points; above, purity is estimated on a seeded sample of that many
        balls (standard error ≈ 0.5 percentage points)."""
        queries = np.arange(len(points))
        if len(points) > PURITY_SAMPLE:
            queries = np.random.default_rng([seed, 4]).choice(len(points), PURITY_SAMPLE, replace=False)
        to_other = np.full(len(queries), np.inf)
        for start in range(0, len(queries), 512):
            block = queries[start : start + 512]
            similarity = points[block] @ points.T
            similarity[clusters[block, None] == clusters[None, :]] = -np.inf
            to_other[start : start + 512] = np.sqrt(np.maximum(2.0 - 2.0 * similarity.max(axis=1), 0.0))
        finite = to_other[np.isfinite(to_other)]
        return float(np.quantile(finite, 1.0 - PURITY)) * (1 - 1e-6) if len(finite) else 0.0

    @staticmethod
    def ball_graph(points: np.ndarray, delta: float):
        """Sparse symmetric adjacency of the δ-balls (self included), built block by block from cosines."""
        from scipy.sparse import csr_matrix

        threshold = 1.0 - delta**2 / 2.0  # ‖x − y‖ ≤ δ  ⇔  cos(x, y) ≥ 1 − δ²/2 for unit rows
        indices, counts = [], []
        for start in range(0, len(points), 1024):
            inside = (points[start : start + 1024] @ points.T) >= threshold - 1e-6
            np.fill_diagonal(inside[:, start : start + 1024], True)
            rows, cols = np.nonzero(inside)
            indices.append(cols)
            counts.append(np.bincount(rows, minlength=len(inside)))
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
        columns = np.concatenate(indices)
        return csr_matrix((np.ones(len(columns), dtype=np.int8), columns, indptr), shape=(len(points),) * 2)


class OracleBalancedSelector:
    """Evaluation only: K/2 random positives and K/2 random negatives, using the episode's labels.

    The reference for how much a label-blind selector could gain by balancing classes alone.
    When one class runs short the other fills the budget."""

    uses_labels = True

    def select(self, embeddings, k, *, seed, metadata=None):
        if metadata is None or LABEL_COLUMN not in metadata.columns:
            raise InputError("oracle-balanced needs the pool's labels; it works only inside `xsel evaluate`")
        labels = metadata[LABEL_COLUMN].to_numpy()
        rng = np.random.default_rng(seed)
        positives = rng.permutation(np.flatnonzero(labels == 1))
        negatives = rng.permutation(np.flatnonzero(labels != 1))
        k = min(k, len(labels))
        take_pos = min(len(positives), max(k // 2, k - len(negatives)))
        take_neg = k - take_pos
        interleaved = [i for pair in zip(positives[:take_pos], negatives[:take_neg], strict=False) for i in pair]
        rest = [*positives[len(interleaved) // 2 : take_pos], *negatives[len(interleaved) // 2 : take_neg]]
        return np.asarray(interleaved + rest, dtype=np.int64)


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
        import copy

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
        """(N, len(columns)) float64 logits of the chosen labels, in batches of ``MODEL_BATCH`` rows."""
        import torch

        self._check_dimension(embeddings)
        head = self._head()
        blocks = []
        with torch.no_grad():
            for start in range(0, len(embeddings), MODEL_BATCH):
                block = torch.from_numpy(np.asarray(embeddings[start : start + MODEL_BATCH], dtype=np.float64))
                blocks.append(head(block)[:, self.columns].numpy())
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.columns)))

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
    import torch.nn.functional as F

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
        import torch

        self._check_dimension(embeddings)
        head = self._head()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        scale = float(np.median(np.linalg.norm(embeddings, axis=1))) if len(embeddings) else 1.0
        scale = scale if scale > 0 else 1.0
        rng = np.random.default_rng([seed, 5])
        result = np.zeros(len(embeddings))
        for start in range(0, len(embeddings), MODEL_BATCH):
            x = torch.from_numpy(embeddings[start : start + MODEL_BATCH].astype(np.float64))
            d = torch.from_numpy(rng.standard_normal(tuple(x.shape)))
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            clean = head(x)[:, self.columns]
            probe = (self.xi * scale * d).requires_grad_(True)
            divergence = bernoulli_kl(clean, head(x + probe)[:, self.columns]).sum()
            (gradient,) = torch.autograd.grad(divergence, probe)
            direction = gradient / gradient.norm(dim=1, keepdim=True).clamp_min(1e-300)
            with torch.no_grad():
                adversarial = head(x + self.epsilon * scale * direction)[:, self.columns]
                result[start : start + len(x)] = bernoulli_kl(clean, adversarial).mean(dim=1).clamp_min(0).numpy()
        return result

    def density(self, embeddings: np.ndarray, seed: int) -> np.ndarray:
        """ρ(x) of the docstring, (N,) in (0, 1]; cosine neighbours found block by block (no N×N matrix)."""
        points = unit_rows(embeddings)
        n = len(points)
        reference = _subsample(n, seed, LARGE_POOL) if n <= LARGE_POOL else _subsample(n, seed, DENSITY_REFERENCE)
        neighbours = min(self.neighbours, len(reference) - 1)
        if neighbours < 1:
            return np.ones(n)
        mean_distance = np.empty(n)
        for start in range(0, n, 1024):
            similarity = points[start : start + 1024] @ points[reference].T
            rows, columns = np.nonzero(reference[None, :] == np.arange(start, start + len(similarity))[:, None])
            similarity[rows, columns] = -np.inf  # a row is not its own neighbour
            nearest = np.partition(similarity, -neighbours, axis=1)[:, -neighbours:]
            mean_distance[start : start + 1024] = np.sqrt(np.maximum(2.0 - 2.0 * nearest, 0.0)).mean(axis=1)
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


@hookimpl
def register_selectors(register):
    register("random", RandomSelector, description="uniformly random picks (the reference)")
    register("kmedoids", KMedoidsSelector, description="k-medoids++ medoids, largest cluster first (MedSelect)")
    register("kcenter", KCenterSelector, aliases=("coreset",), description="greedy k-center core-set")
    register("typiclust", TypiClustSelector, description="most typical point of each k-means cluster")
    register("probcover", ProbCoverSelector, description="greedy δ-ball coverage, δ from 95% k-means purity")
    register(
        "medselect",
        MedSelectSelector,
        description="learned BiLSTM selector (MedSelect); needs checkpoint=RUN_DIR/selector.pt",
    )
    register(
        "oracle-balanced",
        OracleBalancedSelector,
        description="evaluation only: K/2 positives + K/2 negatives from the labels",
    )
    register(
        "uncertainty",
        UncertaintySelector,
        description="most uncertain predictions of a classifier (entropy or margin); needs model=classifier.pt",
    )
    register(
        "boostmis",
        BoostMISSelector,
        description="BoostMIS: adversarial (VAT) KL ∪ density-aware entropy; needs model=classifier.pt",
    )
