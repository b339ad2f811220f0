"""Built-in selectors: cold start (random, kmedoids, kcenter, typiclust, probcover, oracle-balanced) and,
once a classifier exists, the next round of active learning (uncertainty, boostmis).

Each ``select(embeddings (N, D) float32, k, *, seed, metadata)`` returns ``min(k, N)`` distinct row
indices in priority order and is a function of its inputs and seed. No selector builds an N×N matrix;
where a pool is larger than ``LARGE_POOL`` the docstring says what is sampled.

Geometry is a measured choice per heuristic. kmedoids, kcenter, typiclust and probcover take ``geometry``:
``"cosine"`` (rows L2-normalised, as the few-shot classifiers compare them) or ``"euclidean"`` (raw rows, so
the norm counts); the family ``NAME:<geometry>`` (``kcenter:cosine``, ``typiclust:euclidean``) reaches either
by name, the plain name is the default. A peer library on raw embeddings had beaten the cosine heuristics on
NIH (issue 16); ``bench/bench_geometry.py`` (EfficientNet-Lite0 realcxr, K=20, pool 100, 100 paired episodes
per condition) measured Euclidean − cosine query AUROC [95% CI] on NIH / Kermany / COVID:
kcenter +0.015 [+0.007, +0.023] / −0.002 [−0.009, +0.004] / +0.077 [+0.057, +0.097]: Euclidean by default;
typiclust +0.005 [−0.003, +0.014], kmedoids +0.005 [−0.004, +0.014], probcover −0.003 [−0.010, +0.003] on NIH:
no CI above 0, so they stay cosine (BENCHMARKS.md, section 12). Where every embedding has the same norm (the
pixels encoder) the two geometries pick alike.

The learned and model-based selectors (medselect, uncertainty, boostmis) live in ``xsel.train`` and are built
through factories that import it only then, so the site runtime never needs torch.
"""

from __future__ import annotations

import numpy as np

from xsel import hookimpl
from xsel.errors import InputError
from xsel.geometry import (
    LARGE_POOL,
    PoolDistances,
    check_geometry,
    describe_distance,
    distance_name,
    geometry_rows,
    squared_distances,
    subsample,
)

TYPICALITY_NEIGHBOURS = 20
TYPICALITY_REFERENCE = 2_000  # typicality is measured against at most this many members of a cluster
REFRESH_BATCH = 512  # kcenter brings this many of the largest stale distances up to date at a time
TYPICLUST_SAMPLE = 100_000  # typiclust clusters larger pools on a seeded sample of this many rows
PURITY = 0.95
PURITY_SAMPLE = 5_000  # probcover estimates ball purity on at most this many balls
LABEL_COLUMN = "label"  # episode labels (1/0) that evaluation passes to selectors with uses_labels


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

    def select_with_reasons(self, embeddings, k, *, seed, metadata=None):
        picks = self.select(embeddings, k, seed=seed)
        return picks, [f"drawn at random (seed {seed})"] * len(picks)


class KCenterSelector:
    """Greedy k-center (core-set): start at the point nearest the mean, then repeatedly take the point
    farthest from everything picked so far. Euclidean by default: the one heuristic whose Euclidean variant
    measured better on NIH (module docstring).

    Exact greedy with lazy updates: a row's distance to its nearest pick only shrinks, so a stale value is an upper
    bound; each step refreshes, against the picks made since, only the rows whose bound could still be the largest
    (a max-heap, ``REFRESH_BATCH`` rows at a time). A few passes over the pool to start, then a small share of it
    per pick instead of a whole pass. No transformed copy of the pool (:class:`~xsel.geometry.PoolDistances`)."""

    uses_labels = False

    def __init__(self, geometry: str = "euclidean"):
        self.geometry = check_geometry(geometry)

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_reasons(embeddings, k, seed=seed)[0]

    def select_with_reasons(self, embeddings, k, *, seed, metadata=None):
        import heapq

        pool = PoolDistances(embeddings, self.geometry)
        k = min(k, len(pool))
        if k == 0:
            return np.zeros(0, dtype=np.int64), []
        first = int(np.argmin(pool.squared_to(pool.centre())[:, 0]))
        centres = np.empty((k, pool.rows.shape[1]), dtype=np.float32)
        centres[0] = pool.points(first)[0]
        nearest = pool.squared_to(centres[:1])[:, 0]  # squared distance to the nearest pick, exact up to picks_seen
        if not np.isfinite(nearest).all():  # NaN never compares: the heap below would never settle
            raise InputError("kcenter: the embeddings hold NaN or infinite values; re-embed them")
        picks_seen = np.ones(len(pool), dtype=np.int64)
        heap = [(-distance, row) for row, distance in enumerate(nearest.tolist()) if row != first]
        heapq.heapify(heap)  # largest bound first; ties: the lowest row, as argmax breaks them
        picks, reasons = [first], ["nearest the centre of the pool"]
        while len(picks) < k:
            # the rows with the largest bounds, brought up to date together against the picks each has not seen
            batch = np.asarray([heapq.heappop(heap)[1] for _ in range(min(REFRESH_BATCH, len(heap)))])
            stale = batch[picks_seen[batch] < len(picks)]
            if len(stale):
                since = int(picks_seen[stale].min())
                squared = pool.squared_to(centres[since : len(picks)], stale)
                squared[np.arange(since, len(picks))[None, :] < picks_seen[stale][:, None]] = np.inf  # seen already
                nearest[stale] = np.minimum(nearest[stale], squared.min(axis=1))
                picks_seen[stale] = len(picks)
            entries = sorted(zip((-nearest[batch]).tolist(), batch.tolist(), strict=True))
            if not heap or entries[0] <= heap[0]:  # exact and at least every bound left: the farthest row
                _, row = entries.pop(0)
                reasons.append(f"farthest from the picks so far ({describe_distance(nearest[row], self.geometry)})")
                centres[len(picks)] = pool.points(row)[0]
                picks.append(row)
            for entry in entries:
                heapq.heappush(heap, entry)
        return np.asarray(picks, dtype=np.int64), reasons


class KMedoidsSelector:
    """MedSelect's clustering baseline: k-medoids (k-medoids++ seeding, alternating updates), label the
    medoids, largest cluster first. Pools above ``LARGE_POOL`` are clustered on a seeded subsample;
    a medoid update over a cluster larger than 2,000 considers the 500 members nearest its mean."""

    uses_labels = False
    max_iterations = 20

    def __init__(self, geometry: str = "cosine"):
        self.geometry = check_geometry(geometry)

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_reasons(embeddings, k, seed=seed)[0]

    def select_with_reasons(self, embeddings, k, *, seed, metadata=None):
        rows = subsample(len(embeddings), seed)
        geometry, points = self.geometry, geometry_rows(embeddings[rows], self.geometry)
        k = min(k, len(points))
        rng = np.random.default_rng(seed)
        medoids = [int(rng.integers(len(points)))]
        nearest = squared_distances(points, points[medoids], geometry)[:, 0]
        for _ in range(k - 1):  # k-medoids++: next medoid drawn with probability ∝ squared distance
            weights = nearest / nearest.sum() if nearest.sum() > 0 else None
            candidate = int(rng.choice(len(points), p=weights))
            if candidate in medoids:
                candidate = int(next(i for i in rng.permutation(len(points)) if i not in medoids))
            medoids.append(candidate)
            nearest = np.minimum(nearest, squared_distances(points, points[candidate : candidate + 1], geometry)[:, 0])
        medoids = np.asarray(medoids)
        for _ in range(self.max_iterations):
            assignment = np.argmin(squared_distances(points, points[medoids], geometry), axis=1)
            updated = medoids.copy()
            for cluster in range(k):
                members = np.flatnonzero(assignment == cluster)
                if len(members) == 0:
                    continue
                candidates = members
                if len(members) > 2_000:
                    mean = points[members].mean(axis=0, keepdims=True)
                    candidates = members[np.argsort(squared_distances(points[members], mean, geometry)[:, 0])[:500]]
                cost = np.sqrt(squared_distances(points[candidates], points[members], geometry)).sum(axis=1)
                updated[cluster] = candidates[int(np.argmin(cost))]
            if np.array_equal(updated, medoids):
                break
            medoids = updated
        medoids = self._distinct(points, medoids, geometry)
        assignment = np.argmin(squared_distances(points, points[medoids], geometry), axis=1)
        sizes = np.bincount(assignment, minlength=k)
        order = np.argsort(-sizes, kind="stable")
        sampled = f" of a {len(rows)}-image sample" if len(rows) < len(embeddings) else ""
        reasons = [
            f"medoid of cluster {rank} of {k}{sampled} ({sizes[c]} images) by {distance_name(geometry)}"
            for rank, c in enumerate(order, 1)
        ]
        return rows[medoids[order]], reasons

    @staticmethod
    def _distinct(points, medoids, geometry):
        """Two clusters can share a medoid on duplicate points: replace repeats by the farthest unused point."""
        unique = list(dict.fromkeys(medoids.tolist()))
        while len(unique) < len(medoids):
            nearest = squared_distances(points, points[unique], geometry).min(axis=1)
            nearest[unique] = -1.0
            unique.append(int(np.argmax(nearest)))
        return np.asarray(unique)


class TypiClustSelector:
    """TypiClust (Hacohen et al. 2022): k-means into min(K, N) clusters; from each cluster, largest first,
    take its most typical point, typicality = 1 / mean distance to its 20 nearest neighbours in the cluster.
    Clusters above ``TYPICALITY_REFERENCE`` members measure typicality against a seeded sample of that size; pools
    above ``TYPICLUST_SAMPLE`` rows are clustered on a seeded sample of that size (k-means into 1,000 clusters of a
    million rows alone would take minutes on a workstation CPU; a sample of 100,000 still gives each of them ~100)."""

    uses_labels = False

    def __init__(self, geometry: str = "cosine"):
        self.geometry = check_geometry(geometry)

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_reasons(embeddings, k, seed=seed)[0]

    def select_with_reasons(self, embeddings, k, *, seed, metadata=None):
        rows = subsample(len(embeddings), seed, TYPICLUST_SAMPLE)
        geometry, points = (
            self.geometry,
            geometry_rows(embeddings[rows] if len(rows) < len(embeddings) else embeddings, self.geometry),
        )
        k = min(k, len(points))
        assignment = kmeans_labels(points, k, seed)
        rng = np.random.default_rng([seed, 2])
        sizes = np.bincount(assignment, minlength=k)
        ranked = []  # per cluster, largest first: members from most to least typical
        for cluster in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero(assignment == cluster)
            if len(members):
                ranked.append(members[np.argsort(-self._typicality(points, members, rng, geometry), kind="stable")])
        # one point per cluster; only when k-means found fewer clusters than K (duplicate points)
        # does a second round take each cluster's next most typical point
        chosen = [
            (int(members[depth]), depth, rank, len(members))
            for depth in range(max(map(len, ranked)))
            for rank, members in enumerate(ranked, 1)
            if depth < len(members)
        ][:k]
        sampled = f" of a {len(rows)}-image sample" if len(rows) < len(embeddings) else ""
        reasons = [
            f"{'most' if depth == 0 else f'number {depth + 1} by'} typical image of cluster {rank} of {len(ranked)}"
            f"{sampled} ({size} images) by {distance_name(geometry)}"
            for _, depth, rank, size in chosen
        ]
        return rows[np.asarray([pick for pick, *_ in chosen], dtype=np.int64)], reasons

    @staticmethod
    def _typicality(points, members, rng, geometry):
        if len(members) == 1:
            return np.ones(1)
        reference = members
        if len(members) > TYPICALITY_REFERENCE:
            reference = np.sort(rng.choice(members, TYPICALITY_REFERENCE, replace=False))
        squared = squared_distances(points[members], points[reference], geometry)
        position = np.minimum(np.searchsorted(reference, members), len(reference) - 1)
        is_self = reference[position] == members  # a member is not its own neighbour
        squared[np.flatnonzero(is_self), position[is_self]] = np.inf
        neighbours = min(TYPICALITY_NEIGHBOURS, len(reference) - 1)
        nearest = np.partition(squared, neighbours - 1, axis=1)[:, :neighbours]
        return 1.0 / (np.sqrt(nearest).mean(axis=1) + 1e-12)


class ProbCoverSelector:
    """ProbCover (Yehuda et al. 2022): greedy maximum coverage of δ-balls.

    δ is the largest radius at which 95% of balls are pure with respect to a k-means clustering into
    min(K, N) clusters. A ball around x is pure iff δ is below x's distance to the nearest point of
    another cluster, so δ is the 5th percentile of those distances: exact, no grid to search. Once
    everything is covered, the remaining picks are the uncovered-gain ties broken by a seeded order.
    Pools above ``LARGE_POOL`` are covered on a seeded subsample.
    """

    uses_labels = False

    def __init__(self, geometry: str = "cosine"):
        self.geometry = check_geometry(geometry)

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_reasons(embeddings, k, seed=seed)[0]

    def select_with_reasons(self, embeddings, k, *, seed, metadata=None):
        rows = subsample(len(embeddings), seed)
        geometry, points = self.geometry, geometry_rows(embeddings[rows], self.geometry)
        n, k = len(points), min(k, len(points))
        delta = self.radius(points, kmeans_labels(points, k, seed), seed, geometry) if k > 1 else 0.0
        graph = self.ball_graph(points, delta, geometry)
        ball = f"its δ-ball (δ = {describe_distance(delta**2, geometry)})"
        gain = np.asarray(graph.sum(axis=1)).ravel().astype(np.int64)
        covered = np.zeros(n, dtype=bool)
        tie_break = np.random.default_rng([seed, 3]).permutation(n)
        picks, reasons = [], []
        for _ in range(k):
            order = np.lexsort((tie_break, -gain))  # largest gain first, seeded tie-break
            pick = next(i for i in order if i not in picks)
            picks.append(int(pick))
            reasons.append(f"{ball} covers {max(gain[pick], 0)} images not covered yet")
            newly = graph.indices[graph.indptr[pick] : graph.indptr[pick + 1]]
            newly = newly[~covered[newly]]
            covered[newly] = True
            if len(newly):
                gain -= np.asarray(graph[newly].sum(axis=0)).ravel().astype(np.int64)  # symmetric graph
            gain[picks[-1]] = -1
        return rows[np.asarray(picks, dtype=np.int64)], reasons

    @staticmethod
    def radius(points: np.ndarray, clusters: np.ndarray, seed: int = 0, geometry: str = "cosine") -> float:
        """Largest δ with purity ≥ 0.95: the 5th percentile of each point's distance to another cluster
        (rows of :func:`~xsel.geometry.geometry_rows`; δ is a Euclidean distance between them).

        Exact up to ``PURITY_SAMPLE`` points; above, purity is estimated on a seeded sample of that many
        balls (standard error ≈ 0.5 percentage points)."""
        queries = np.arange(len(points))
        if len(points) > PURITY_SAMPLE:
            queries = np.random.default_rng([seed, 4]).choice(len(points), PURITY_SAMPLE, replace=False)
        to_other = np.full(len(queries), np.inf)
        for start in range(0, len(queries), 512):
            block = queries[start : start + 512]
            squared = squared_distances(points[block], points, geometry)
            squared[clusters[block, None] == clusters[None, :]] = np.inf
            to_other[start : start + 512] = np.sqrt(squared.min(axis=1))
        finite = to_other[np.isfinite(to_other)]
        return float(np.quantile(finite, 1.0 - PURITY)) * (1 - 1e-6) if len(finite) else 0.0

    @staticmethod
    def ball_graph(points: np.ndarray, delta: float, geometry: str = "cosine"):
        """Sparse symmetric adjacency of the δ-balls (self included), built block by block."""
        from scipy.sparse import csr_matrix

        spread = 1.0 if geometry == "cosine" else float(np.einsum("ij,ij->", points, points)) / max(len(points), 1)
        threshold = delta**2 + 2e-6 * spread  # float32 rounding slack: 2e-6 on unit rows, as much relative to raw ones
        indices, counts = [], []
        for start in range(0, len(points), 1024):
            inside = squared_distances(points[start : start + 1024], points, geometry) <= threshold
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


GEOMETRY_SELECTORS = {
    "kmedoids": KMedoidsSelector,
    "kcenter": KCenterSelector,
    "typiclust": TypiClustSelector,
    "probcover": ProbCoverSelector,
}


def medselect(checkpoint=None):
    """The learned MedSelect selector over a ``selector.pt``; torch is imported only when one is built."""
    from xsel.train.medselect import MedSelectSelector

    return MedSelectSelector(checkpoint)


def setselect(checkpoint=None):
    """The learned set selector over a ``selector.pt`` of ``--model set``; torch is imported only when one is built."""
    from xsel.train.medselect import SetSelector

    return SetSelector(checkpoint)


def uncertainty(model=None, label: str | None = None, measure: str = "entropy"):
    """Uncertainty sampling over a classifier's predictions; torch is imported only when one is built."""
    from xsel.train.uncertainty import UncertaintySelector

    return UncertaintySelector(model, label, measure)


def boostmis(model=None, label: str | None = None, xi=None, epsilon=None, neighbours=None):
    """BoostMIS over a classifier's predictions (tuning left unset keeps its defaults); torch is imported only
    when one is built."""
    from xsel.train.uncertainty import BoostMISSelector

    tuning = {
        key: value for key, value in (("xi", xi), ("epsilon", epsilon), ("neighbours", neighbours)) if value is not None
    }
    return BoostMISSelector(model, label, **tuning)


@hookimpl
def register_selectors(register):
    register("random", RandomSelector, description="uniformly random picks (the reference)")
    register("kmedoids", KMedoidsSelector, description="k-medoids++ medoids, largest cluster first (MedSelect); cosine")
    register("kcenter", KCenterSelector, aliases=("coreset",), description="greedy k-center core-set; Euclidean")
    register("typiclust", TypiClustSelector, description="most typical point of each k-means cluster; cosine")
    register("probcover", ProbCoverSelector, description="greedy δ-ball coverage, δ from 95% k-means purity; cosine")
    for name, factory in GEOMETRY_SELECTORS.items():  # the family's rest of the name is the factory's geometry
        register(
            f"{name}:",
            factory,
            prefix=True,
            metavar="geometry",
            description=f"{name} in a chosen geometry: {name}:cosine or {name}:euclidean (raw embeddings)",
        )
    register(
        "medselect",
        medselect,
        description="learned BiLSTM selector (MedSelect); needs checkpoint=RUN_DIR/selector.pt",
    )
    register(
        "setselect",
        setselect,
        description="learned set selector: order-free, sequential picks; needs checkpoint=RUN_DIR/selector.pt "
        "of `train selector --model set`",
    )
    register(
        "oracle-balanced",
        OracleBalancedSelector,
        description="evaluation only: K/2 positives + K/2 negatives from the labels",
    )
    register(
        "uncertainty",
        uncertainty,
        description="most uncertain predictions of a classifier (entropy or margin); needs model=classifier.pt",
    )
    register(
        "boostmis",
        boostmis,
        description="BoostMIS: adversarial (VAT) KL ∪ density-aware entropy; needs model=classifier.pt",
    )
