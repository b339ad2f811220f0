"""The trust gate: a learned selector knowing when not to trust itself.

A learned selector is only as good as the pools it was trained on. Its gate keeps a seeded sample of training-pool
embeddings (``reference``) and, at select time, measures how far the pool lies from them with the unbiased MMD²
(U-statistic, RBF kernel on unit-length rows, bandwidth by the median heuristic on the reference). Beyond a threshold
calibrated on held-out training pools — the ``quantile`` of their statistics, so about ``1 - quantile`` of pools
like the training ones fire by chance — the framework (:func:`xsel.selectors.gated`) lets the heuristic that
validated best pick instead and says so. Numpy only: a site runs the same gate from its bundle without torch.

A selector trained on several hospitals (``--episodes-within``) also keeps one reference per hospital, and the
statistic is the MMD² to the *nearest mixture* of the references (weights on the simplex, one bandwidth): a pool of
one training hospital, or of any blend of them, is home. Compared with the training images as one mixture (mostly
the largest hospital), the pools of a smaller training hospital looked foreign (Kermany 240/240); compared with each
hospital alone, a pool mixing two of them did (two NIH repackagings: 97 of 360 home pools fell back; BENCHMARKS.md
§13). Each hospital's reference is then split into ``CLUSTERS`` k-means clusters, each a reference of its own: a
labelling pool holds one finding's positives and the normals, a re-weighting of the hospital's regions, and is home
too. With hospitals whole such pools set the threshold (MoCo, NIH + Kermany: 0.013 to 0.051 over five seeds) and
the COVID sources' pools fell under it on four of the five; split, the gate fired on 94–100% of them on every seed
and stayed quiet at home (§13). With one training hospital the reference stays whole by default: there clusters let
up to 10% of home pools fire on two of five seeds (EfficientNet-Lite0; 0–2% whole), though with MoCo they fired on
every COVID pool where whole references fired on 68–100%.

Cost: the pool is subsampled (seeded, without replacement, rows kept in store order) to the ``pool_size`` the
threshold was calibrated at, so a 1,000,000-row pool costs what a training pool does: two kernels of at most
``pool_size`` × ``max(pool_size, R)`` entries.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from xsel import plugins
from xsel.errors import InputError
from xsel.geometry import cluster_labels

KEEP_LEARNED = "learned"  # a fallback that keeps the learned selector: on another hospital's pools it beat them all
STATISTIC = "mmd2-rbf"  # what `statistic` computes; recorded so a reader knows which numbers it compares
MAX_REFERENCE = 500
MAX_POOL = 2000  # a larger calibration pool is subsampled to this: the kernels stay a few MB


MIXTURE = "training pools"  # the name of the reference sampled from every training image
CLUSTERS = 4  # k-means clusters per hospital's reference (a one-off check with 8: up to 9% of Kermany's pools fired)
MIN_CLUSTER_ROWS = 20  # a reference of fewer than 2 × this many rows is not split (one cluster per this many rows)
MIX_STEPS = 1000  # Frank-Wolfe steps for the nearest mixture of a few references; it stops earlier once converged


class StaleGateError(InputError):
    """A gate record written by an earlier xsel that this one reads differently; its message says how to renew it."""


@dataclass(frozen=True)
class ReferenceGroup:
    """One reference of a gate beside the training pools' as a whole: a training hospital's (``name``:
    ``COLUMN=value``) or a k-means cluster of one (``of``: the hospital, or ``MIXTURE`` when there is one hospital),
    with how many reference ``rows`` it has (they follow the mixture's in the gate's reference). Verdicts report the
    nearest mixture's weights by ``source``, the hospital."""

    name: str
    rows: int
    of: str = ""

    def __post_init__(self):
        if not all(isinstance(text, str) for text in (self.name, self.of)) or not isinstance(self.rows, int):
            raise InputError(f"trust gate group: needs a name and a row count, got {self.name!r}, {self.rows!r}")
        if self.rows < 2:
            raise InputError(f"trust gate group {self.name!r}: needs at least 2 reference rows, got {self.rows}")

    @property
    def source(self) -> str:
        return self.of or self.name

    def to_record(self) -> dict:
        return {"name": self.name, "rows": int(self.rows), **({"of": self.of} if self.of else {})}


@dataclass(frozen=True)
class TrustVerdict:
    """One check of a pool: its statistic (None for a pool too small to compare) and the threshold, whether the gate
    fired, the heuristic it falls back to, how many pool rows were compared, a one-line message for the user, the
    source with the largest weight in the nearest mixture (``nearest``: a training hospital, or the training pools as
    a whole; a cluster's weight counts for its hospital) and that mixture's weights by source (``mix``, ≥ 0.01)."""

    statistic: float | None
    threshold: float
    fired: bool
    fallback: str
    compared: int
    message: str
    nearest: str = MIXTURE
    mix: dict = field(default_factory=dict, hash=False)

    @property
    def fell_back(self) -> bool:
        """Whether another selector picks: the gate fired and its fallback is a heuristic, not ``KEEP_LEARNED``."""
        return self.fired and self.fallback != KEEP_LEARNED

    def to_record(self) -> dict:
        """JSON-able: what a certificate records under ``fallback``."""
        return {
            "gate": STATISTIC,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "fired": self.fired,
            "fell_back": self.fell_back,
            "fallback": self.fallback,
            "compared_rows": self.compared,
            "nearest": self.nearest,
            "mix": dict(self.mix),
            "message": self.message,
        }


@dataclass(frozen=True, eq=False)
class TrustGate:
    """What a learned selector carries to judge a pool: ``reference`` (R, D) float32 unit rows sampled from its
    training pools, the ``threshold`` on the MMD² statistic, the ``fallback`` heuristic's registered name, the
    ``pool_size`` the threshold was calibrated at (bigger pools are subsampled to it), the RBF ``bandwidth`` and
    how it was ``calibration``-ed (quantile, held-out pools, their statistics' median and max; with groups each
    part's quantile, ``quantiles``, the threshold their largest). ``groups``: one
    :class:`ReferenceGroup` per training hospital or per cluster of one, their reference rows after the mixture's in
    ``reference``; the statistic then compares the pool with the nearest mixture of all the references."""

    reference: np.ndarray
    threshold: float
    fallback: str
    pool_size: int
    bandwidth: float
    calibration: dict = field(default_factory=dict)
    groups: tuple[ReferenceGroup, ...] = ()

    def __post_init__(self):
        reference = np.asarray(self.reference)
        if reference.ndim != 2 or len(reference) < 2 or not np.issubdtype(reference.dtype, np.floating):
            raise InputError(
                f"trust gate: the reference must be a float (R, D) array of at least 2 rows, got {reference.dtype} "
                f"{reference.shape}"
            )
        if not np.isfinite(reference).all():
            raise InputError("trust gate: the reference holds NaN or infinite values")
        numbers = {"threshold": self.threshold, "bandwidth": self.bandwidth}
        if not all(_finite_number(v) for v in numbers.values()) or not self.bandwidth > 0:
            raise InputError(f"trust gate: threshold and bandwidth must be finite, bandwidth > 0; got {numbers}")
        if not isinstance(self.pool_size, int) or self.pool_size < 2 or not isinstance(self.fallback, str):
            raise InputError(
                f"trust gate: pool_size must be an integer ≥ 2 and fallback a selector name; got {self.pool_size!r}, "
                f"{self.fallback!r}"
            )
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(reference) - sum(group.rows for group in self.groups) < 2:
            raise InputError(
                f"trust gate: its {len(self.groups)} groups claim {sum(g.rows for g in self.groups)} of the "
                f"{len(reference)} reference rows; at least 2 must remain for the training pools as a whole"
            )
        norms = np.linalg.norm(reference.astype(np.float64), axis=1)
        if not np.allclose(norms, 1.0, rtol=0, atol=1e-5):  # unit rows stay bit for bit: a stored gate reloads equal
            reference = _unit(reference.astype(np.float64))
        object.__setattr__(self, "reference", reference.astype(np.float32))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "bandwidth", float(self.bandwidth))

    @property
    def dim(self) -> int:
        return int(self.reference.shape[1])

    def compared_rows(self, rows: int, seed: int) -> np.ndarray:
        """Which rows of a ``rows``-row pool the statistic reads: all of them up to ``pool_size``, else a seeded
        sample of ``pool_size`` (``default_rng(seed)``, without replacement) in store order."""
        if rows <= self.pool_size:
            return np.arange(rows)
        return np.sort(np.random.default_rng(seed).choice(rows, self.pool_size, replace=False))

    def statistic(self, embeddings: np.ndarray, seed: int) -> float:
        """Unbiased MMD² between the pool (subsampled to ``pool_size``, unit-normalised) and the nearest mixture of
        the references: the training pools as a whole and, in a grouped gate, each training hospital's (or its
        clusters)."""
        return self._nearest_mix(self._pool(embeddings, seed))[0]

    @cached_property
    def _components(self) -> list[tuple[str, np.ndarray]]:
        """``(name, unit reference rows as float64)`` of the mixture, then of each group; computed once per gate."""
        reference = self.reference.astype(np.float64)
        start = len(reference) - sum(group.rows for group in self.groups)
        components = [(MIXTURE, reference[:start])]
        for group in self.groups:
            components.append((group.name, reference[start : start + group.rows]))
            start += group.rows
        return components

    @cached_property
    def _gram(self) -> np.ndarray:
        """Mean kernel between every two references (within one: without the diagonal, as the unbiased MMD² has
        it); the quadratic term of the MMD² to a mixture of them."""
        rows = [rows for _, rows in self._components]
        gram = np.empty((len(rows), len(rows)))
        for i, a in enumerate(rows):
            for j, b in enumerate(rows[: i + 1]):
                kernel = _kernel(a, b, self.bandwidth)
                if i == j:
                    gram[i, i] = (kernel.sum() - np.trace(kernel)) / (len(a) * (len(a) - 1))
                else:
                    gram[i, j] = gram[j, i] = kernel.mean()
        return gram

    def _nearest_mix(self, pool: np.ndarray) -> tuple[float, np.ndarray]:
        """The MMD² between ``pool`` (unit float64 rows) and the mixture of the references nearest to it, and that
        mixture's weights: a small quadratic programme on the simplex, solved by Frank-Wolfe with exact steps (one
        reference: weight 1, the plain unbiased MMD²)."""
        within = _kernel(pool, pool, self.bandwidth)
        np.fill_diagonal(within, 0.0)
        pool_term = within.sum() / (len(pool) * (len(pool) - 1))
        cross = np.array([_kernel(pool, rows, self.bandwidth).mean() for _, rows in self._components])
        gram, weights = self._gram, np.full(len(cross), 1.0 / len(cross))
        for _ in range(MIX_STEPS if len(cross) > 1 else 0):
            gradient = 2.0 * (gram @ weights - cross)
            direction = -weights
            direction[int(np.argmin(gradient))] += 1.0
            gap, curvature = -float(gradient @ direction), float(direction @ gram @ direction)
            if gap <= 1e-12:
                break
            weights = weights + (1.0 if curvature <= 0 else min(1.0, gap / (2.0 * curvature))) * direction
        return float(pool_term - 2.0 * cross @ weights + weights @ gram @ weights), weights

    def _pool(self, embeddings: np.ndarray, seed: int) -> np.ndarray:
        """The pool's compared rows, unit-normalised float64, after checking shape and values."""
        shape = getattr(embeddings, "shape", ())
        if len(shape) != 2 or shape[1] != self.dim:
            raise InputError(
                f"trust gate: the pool's embeddings are {tuple(shape)}, the gate compares {self.dim}-d rows; use the "
                "encoder the selector was trained with"
            )
        if shape[0] < 2:
            raise InputError(f"trust gate: a pool of {shape[0]} rows cannot be compared; it needs at least 2")
        pool = np.asarray(embeddings[self.compared_rows(shape[0], seed)], dtype=np.float64)
        if not np.isfinite(pool).all():
            raise InputError("trust gate: the pool's embeddings hold NaN or infinite values")
        return _unit(pool)

    def check(self, embeddings: np.ndarray, seed: int) -> TrustVerdict:
        """The verdict on one pool: it fires when its MMD² to the nearest mixture of the references (the training
        pools as a whole and each training hospital's, or its clusters) exceeds the threshold. A pool of fewer than
        2 rows cannot be judged and keeps the learned selector."""
        compared = len(self.compared_rows(len(embeddings), seed))
        if len(embeddings) < 2:
            message = f"the trust gate needs at least 2 images to compare, the pool has {len(embeddings)}"
            return TrustVerdict(None, self.threshold, False, self.fallback, compared, message)
        value, weights = self._nearest_mix(self._pool(embeddings, seed))
        by_source: dict[str, float] = {}  # a cluster's weight counts for the hospital it is a cluster of
        for source, weight in zip([MIXTURE, *(group.source for group in self.groups)], weights, strict=True):
            by_source[source] = by_source.get(source, 0.0) + float(weight)
        threshold, fired = self.threshold, value > self.threshold
        mix = {name: round(weight, 3) for name, weight in by_source.items() if weight >= 0.01}
        nearest = max(by_source, key=by_source.get)
        pools = " + ".join(f"{weight:.0%} {name}" for name, weight in sorted(mix.items(), key=lambda e: -e[1]))
        pools = f"training pools (nearest mix: {pools})" if len(by_source) > 1 else MIXTURE
        differs = f"this pool differs from the selector's {pools} (MMD² {value:.3g} > threshold {threshold:.3g})"
        if fired and self.fallback == KEEP_LEARNED:
            message = (
                f"{differs}; the learned selector picked all the same: on another hospital's labelled pools it "
                "validated better than every heuristic (`xsel train selector --choose-fallback`)"
            )
        elif fired:
            message = (
                f"{differs}: fell back to {self.fallback}, the heuristic that validated best; "
                "--no-trust-gate uses the learned selector anyway"
            )
        else:
            message = (
                f"this pool resembles the selector's {pools} (MMD² {value:.3g} ≤ threshold {threshold:.3g}): the "
                "learned selector picked"
            )
        return TrustVerdict(value, threshold, bool(fired), self.fallback, compared, message, nearest, mix)

    def to_record(self) -> dict:
        """JSON-able, without the reference (stored beside it: a tensor in a checkpoint, a .npy in a bundle)."""
        return {
            "statistic": STATISTIC,
            "threshold": self.threshold,
            "fallback": self.fallback,
            "pool_size": int(self.pool_size),
            "bandwidth": self.bandwidth,
            "reference_rows": int(len(self.reference)),
            "dim": self.dim,
            "calibration": dict(self.calibration),
            "groups": [group.to_record() for group in self.groups],
        }

    @classmethod
    def from_record(cls, record: dict, reference: np.ndarray) -> TrustGate:
        """The gate a record and its reference describe; a record of another statistic or shape is refused."""
        if not isinstance(record, dict):
            raise InputError(f"trust gate: the record is a {type(record).__name__}, not a mapping")
        missing = [key for key in ("threshold", "fallback", "pool_size", "bandwidth") if key not in record]
        if missing:
            raise InputError(f"trust gate: the record lacks {', '.join(missing)}")
        if record.get("statistic", STATISTIC) != STATISTIC:
            raise InputError(f"trust gate: statistic {record['statistic']!r}, this xsel computes {STATISTIC}")
        reference = np.asarray(reference)
        expected = (record.get("reference_rows", len(reference)), record.get("dim", reference.shape[-1]))
        if reference.ndim != 2 or reference.shape != tuple(expected):
            raise InputError(f"trust gate: the reference is {reference.shape}, its record says {tuple(expected)}")
        groups = record.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
            raise InputError("trust gate: its record's groups are not a list of mappings")
        if any("threshold" in group for group in groups):
            raise StaleGateError(
                "trust gate: it keeps a threshold per training hospital, as xsel calibrated such gates before the "
                "nearest-mixture statistic; recalibrate it on the store it was trained on (`xsel train selector "
                "STORE --recalibrate-gate RUN/selector.pt --out NEW_RUN`; a bundle: export it again from NEW_RUN)"
            )
        try:
            groups = tuple(ReferenceGroup(**group) for group in groups)
        except TypeError as error:
            raise InputError(f"trust gate: a group of its record is malformed ({error})") from None
        return cls(
            reference=reference,
            threshold=record["threshold"],
            fallback=record["fallback"],
            pool_size=record["pool_size"],
            bandwidth=record["bandwidth"],
            calibration=dict(record.get("calibration", {})),
            groups=groups,
        )


def _finite_number(value) -> bool:
    numeric = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    return numeric and math.isfinite(value)


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero): the gate compares directions, as cosine classifiers do."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """RBF kernel exp(−‖x − y‖² / 2σ²) of unit rows, from their dot products (‖x − y‖² = 2 − 2 x·y)."""
    squared = np.maximum(2.0 - 2.0 * (x @ y.T), 0.0)
    return np.exp(-squared / (2.0 * bandwidth**2))


def median_bandwidth(reference: np.ndarray) -> float:
    """The median heuristic: the median distance between distinct reference rows (unit rows)."""
    unit = _unit(np.asarray(reference, dtype=np.float64))
    distances = np.sqrt(np.maximum(2.0 - 2.0 * (unit @ unit.T), 0.0))[np.triu_indices(len(unit), k=1)]
    bandwidth = float(np.median(distances))
    if not bandwidth > 0:
        raise InputError("trust gate: the reference embeddings all point the same way; no bandwidth can be chosen")
    return bandwidth


def check_fallback(name: str) -> str:
    """The registered name of a fallback; it must be a heuristic (no checkpoint, no classifier, no labels), or
    ``KEEP_LEARNED``."""
    if name == KEEP_LEARNED:
        return name
    entry = plugins.get("selector", name)
    takes = set(inspect.signature(entry.factory).parameters) & {"checkpoint", "model"}
    if takes or getattr(entry.factory(), "uses_labels", False):
        needs = f"needs a {next(iter(takes))}" if takes else "picks with the labels"
        raise InputError(f"trust gate fallback {entry.name!r} {needs}; choose a heuristic such as kcenter or typiclust")
    return entry.name


def calibrate_gate(
    reference_embeddings: np.ndarray,
    held_out_pools: list[np.ndarray],
    *,
    fallback: str,
    quantile: float = 0.99,
    seed: int = 0,
    reference_size: int = MAX_REFERENCE,
    groups: dict[str, tuple[np.ndarray, list[np.ndarray]]] | None = None,
    clusters: int | None = None,
) -> TrustGate:
    """A gate whose threshold is the ``quantile`` of the statistics of ``held_out_pools`` (training-distribution
    pools not sampled for the reference), so pools like them fire with probability about ``1 - quantile``.

    The reference is a seeded sample of ``reference_size`` rows (at most 500) of ``reference_embeddings``; the gate's
    ``pool_size`` is the held-out pools' size (their smallest, at most 2000), the size every pool is compared at.
    ``groups`` maps each training hospital's name to its own reference embeddings and held-out pools: each gets a
    reference alike, the statistic becomes the MMD² to the nearest mixture of the references, and the threshold is
    the largest of the ``quantile`` of each hospital's held-out pools and of ``held_out_pools``: every training
    hospital's pools fire with probability about ``1 - quantile``, not only the pools of all of them together (one
    quantile over all let a seen hospital whose statistics spread wider fire on 67 of 240 of its pools). Each
    hospital's reference (with no ``groups``, the training pools') is then split into ``clusters`` seeded k-means
    clusters (:func:`_clustered`; 1: not split), which join the nearest mixture in the hospital's place (with no
    ``groups``, beside the whole training pools' reference: its rows are kept twice); None: ``CLUSTERS`` with
    ``groups``, whole without (with one hospital clusters let more of its held-out pools fire; §13)."""
    if not 0 < quantile <= 1:
        raise InputError(f"trust gate: quantile {quantile} must lie in (0, 1]")
    if not 2 <= reference_size <= MAX_REFERENCE:
        raise InputError(f"trust gate: reference_size {reference_size} must lie in [2, {MAX_REFERENCE}]")
    clusters = check_clusters(clusters) or (CLUSTERS if groups else 1)
    groups = groups or {}
    parts = {MIXTURE: held_out_pools, **{name: hospital_pools for name, (_, hospital_pools) in groups.items()}}
    sizes = [len(pool) for part in parts.values() for pool in part]
    if not all(parts.values()) or min(sizes) < 2:
        empty = [name for name, part in parts.items() if not part]
        raise InputError(
            "trust gate: calibration needs held-out pools of at least 2 rows each; "
            + (f"{', '.join(empty)} has none" if empty else f"the smallest of {len(sizes)} has {min(sizes)}")
        )
    rng = np.random.default_rng(seed)
    reference = _reference_sample(reference_embeddings, reference_size, rng)
    hospitals = {name: _reference_sample(embeddings, reference_size, rng) for name, (embeddings, _) in groups.items()}
    references = [(ReferenceGroup(name, len(rows)), rows) for name, rows in hospitals.items()]
    if clusters > 1:
        split = hospitals or {MIXTURE: reference}
        references = [cluster for name, rows in split.items() for cluster in _clustered(name, rows, clusters, seed)]
    gate = TrustGate(
        reference=np.concatenate([reference, *(rows for _, rows in references)]).astype(np.float32),
        threshold=0.0,
        fallback=check_fallback(fallback),
        pool_size=min(min(sizes), MAX_POOL),
        bandwidth=median_bandwidth(reference),
        groups=tuple(group for group, _ in references),
    )
    threshold, calibration = _calibrated(gate, parts, quantile, seed)
    return replace(gate, threshold=threshold, calibration=calibration | {"clusters": clusters})


def _clustered(name: str, rows: np.ndarray, clusters: int, seed: int) -> list[tuple[ReferenceGroup, np.ndarray]]:
    """``rows`` (unit) split into at most ``clusters`` seeded k-means clusters of at least ``MIN_CLUSTER_ROWS``
    rows on average, as references of ``name`` (largest first, rows in their reference order); clusters of fewer than
    2 rows are dropped. Too few rows to split: one cluster, all of them."""
    count = min(clusters, len(rows) // MIN_CLUSTER_ROWS)
    labels = cluster_labels(rows, count, seed) if count > 1 else np.zeros(len(rows), dtype=int)
    order = np.argsort(-np.bincount(labels, minlength=max(count, 1)), kind="stable")
    kept = [rows[labels == label] for label in order if (labels == label).sum() >= 2]
    return [
        (ReferenceGroup(f"{name} (cluster {index} of {len(kept)})", len(part), of=name), part)
        for index, part in enumerate(kept, start=1)
    ]


def check_clusters(clusters) -> int | None:
    """``clusters`` as an int ≥ 1, or None (the default: :func:`calibrate_gate` decides); anything else is refused."""
    if clusters is None:
        return None
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) or clusters < 1:
        raise InputError(f"trust gate: clusters {clusters!r} must be an integer ≥ 1 (1: references whole)")
    return int(clusters)


def _reference_sample(embeddings: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded sample of ``size`` rows (all of them if fewer), in store order, unit-normalised float64."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise InputError(f"trust gate: reference embeddings must be (N ≥ 2, D), got {embeddings.shape}")
    picked = np.sort(rng.choice(len(embeddings), min(size, len(embeddings)), replace=False))
    return _unit(np.asarray(embeddings[picked], dtype=np.float64))


def _calibrated(gate: TrustGate, parts: dict[str, list[np.ndarray]], quantile: float, seed: int) -> tuple[float, dict]:
    """The largest ``quantile`` of the held-out pools' statistics against the gate's references, part by part
    (the training pools as a whole, each hospital), and the record of how it was calibrated."""
    pools = [pool for part in parts.values() for pool in part]
    statistics = np.asarray([gate.statistic(pool, seed=seed + i) for i, pool in enumerate(pools)])
    ends = np.cumsum([0, *map(len, parts.values())])
    quantiles = {
        name: float(np.quantile(statistics[a:b], quantile))
        for name, a, b in zip(parts, ends[:-1], ends[1:], strict=True)
    }
    calibration = {
        "quantile": float(quantile),
        "pools": len(statistics),
        "median": float(np.median(statistics)),
        "max": float(statistics.max()),
        "seed": int(seed),
        **({"quantiles": quantiles} if len(parts) > 1 else {}),
    }
    return max(quantiles.values()), calibration
