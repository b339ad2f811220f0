"""The trust gate: a learned selector knowing when not to trust itself.

A learned selector is only as good as the pools it was trained on. Its gate keeps a seeded sample of training-pool
embeddings (``reference``) and, at select time, measures how far the pool lies from them with the unbiased MMD²
(U-statistic, RBF kernel on unit-length rows, bandwidth by the median heuristic on the reference). Beyond a threshold
calibrated on held-out training pools — the ``quantile`` of their statistics, so about ``1 - quantile`` of pools
like the training ones fire by chance — the framework (:func:`xsel.selectors.gated`) lets the heuristic that
validated best pick instead and says so. Numpy only: a site runs the same gate from its bundle without torch.

A selector trained on several hospitals (``--episodes-within``) also keeps one reference per hospital, each with
its own threshold calibrated on that hospital's held-out pools, and the gate fires only when a pool lies beyond
every one of them: compared with the training images as one mixture (mostly the largest hospital), the pools of a
smaller training hospital would look foreign (BENCHMARKS.md §13).

Cost: the pool is subsampled (seeded, without replacement, rows kept in store order) to the ``pool_size`` the
threshold was calibrated at, so a 1,000,000-row pool costs what a training pool does: two kernels of at most
``pool_size`` × ``max(pool_size, R)`` entries.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace

import numpy as np

from xsel import plugins
from xsel.errors import InputError

KEEP_LEARNED = "learned"  # a fallback that keeps the learned selector: on another hospital's pools it beat them all
STATISTIC = "mmd2-rbf"  # what `statistic` computes; recorded so a reader knows which numbers it compares
MAX_REFERENCE = 500
MAX_POOL = 2000  # a larger calibration pool is subsampled to this: the kernels stay a few MB


MIXTURE = "training pools"  # the name of the reference sampled from every training image


@dataclass(frozen=True)
class ReferenceGroup:
    """One training hospital's reference in a grouped gate: its ``name`` (``COLUMN=value``), how many reference
    ``rows`` it has (they follow the mixture's in the gate's reference), its own ``threshold`` and ``bandwidth``,
    and how it was ``calibration``-ed."""

    name: str
    rows: int
    threshold: float
    bandwidth: float
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        numbers = {"threshold": self.threshold, "bandwidth": self.bandwidth}
        if not isinstance(self.name, str) or not isinstance(self.rows, int) or self.rows < 2:
            raise InputError(
                f"trust gate group: needs a name and at least 2 reference rows, got {self.name!r}, {self.rows!r}"
            )
        if not all(_finite_number(v) for v in numbers.values()) or not self.bandwidth > 0:
            raise InputError(
                f"trust gate group {self.name!r}: threshold and bandwidth must be finite, bandwidth > 0; got {numbers}"
            )
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "bandwidth", float(self.bandwidth))

    def to_record(self) -> dict:
        return {
            "name": self.name,
            "rows": int(self.rows),
            "threshold": self.threshold,
            "bandwidth": self.bandwidth,
            "calibration": dict(self.calibration),
        }


@dataclass(frozen=True)
class TrustVerdict:
    """One check of a pool: its statistic (None for a pool too small to compare) and the threshold, both of the
    reference the pool lies ``nearest`` to (relative to its threshold), whether the gate fired, the heuristic it falls
    back to, how many pool rows were compared, and a one-line message for the user."""

    statistic: float | None
    threshold: float
    fired: bool
    fallback: str
    compared: int
    message: str
    nearest: str = MIXTURE

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
            "message": self.message,
        }


@dataclass(frozen=True, eq=False)
class TrustGate:
    """What a learned selector carries to judge a pool: ``reference`` (R, D) float32 unit rows sampled from its
    training pools, the ``threshold`` on the MMD² statistic, the ``fallback`` heuristic's registered name, the
    ``pool_size`` the threshold was calibrated at (bigger pools are subsampled to it), the RBF ``bandwidth`` and
    how it was ``calibration``-ed (quantile, held-out pools, their statistics' median and max). ``groups``: one
    :class:`ReferenceGroup` per training hospital, their reference rows after the mixture's in ``reference``."""

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
        """Unbiased MMD² between the pool (subsampled to ``pool_size``, unit-normalised) and the reference of the
        training pools as a whole."""
        return mmd2(self._pool(embeddings, seed), self._blocks()[0][1], self.bandwidth)

    def statistics(self, embeddings: np.ndarray, seed: int) -> list[tuple[str, float, float]]:
        """``(name, MMD², threshold)`` against every reference: the training pools as a whole, then each group."""
        pool = self._pool(embeddings, seed)
        return [(name, mmd2(pool, rows, bandwidth), threshold) for name, rows, threshold, bandwidth in self._blocks()]

    def _blocks(self) -> list[tuple[str, np.ndarray, float, float]]:
        """``(name, unit reference rows as float64, threshold, bandwidth)`` of the mixture, then of each group."""
        reference = self.reference.astype(np.float64)
        start = len(reference) - sum(group.rows for group in self.groups)
        blocks = [(MIXTURE, reference[:start], self.threshold, self.bandwidth)]
        for group in self.groups:
            blocks.append((group.name, reference[start : start + group.rows], group.threshold, group.bandwidth))
            start += group.rows
        return blocks

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
        """The verdict on one pool: it fires when the pool lies beyond the threshold of every reference (the
        training pools as a whole and each training hospital's). A pool of fewer than 2 rows cannot be judged and
        keeps the learned selector."""
        compared = len(self.compared_rows(len(embeddings), seed))
        if len(embeddings) < 2:
            message = f"the trust gate needs at least 2 images to compare, the pool has {len(embeddings)}"
            return TrustVerdict(None, self.threshold, False, self.fallback, compared, message)
        nearest, value, threshold = min(self.statistics(embeddings, seed), key=lambda entry: entry[1] - entry[2])
        fired = value > threshold
        pools = MIXTURE if nearest == MIXTURE else f"training pools of {nearest}"
        differs = (
            f"this pool differs from the selector's training pools (MMD² {value:.3g} > threshold {threshold:.3g}"
            + (f"; nearest: {nearest}, every training hospital beyond its threshold)" if self.groups else ")")
        )
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
        return TrustVerdict(value, threshold, bool(fired), self.fallback, compared, message, nearest)

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


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD² (U-statistic): within-sample kernel means without the diagonal, minus twice the cross mean."""
    m, n = len(x), len(y)
    kxx, kyy = _kernel(x, x, bandwidth), _kernel(y, y, bandwidth)
    np.fill_diagonal(kxx, 0.0)
    np.fill_diagonal(kyy, 0.0)
    return float(kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2.0 * _kernel(x, y, bandwidth).mean())


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
) -> TrustGate:
    """A gate whose threshold is the ``quantile`` of the statistics of ``held_out_pools`` (training-distribution
    pools not sampled for the reference), so pools like them fire with probability about ``1 - quantile``.

    The reference is a seeded sample of ``reference_size`` rows (at most 500) of ``reference_embeddings``; the gate's
    ``pool_size`` is the held-out pools' size (their smallest, at most 2000), the size every pool is compared at.
    ``groups`` maps each training hospital's name to its own reference embeddings and held-out pools: each gets its
    reference and threshold alike, and the gate fires only beyond all of them."""
    if not 0 < quantile <= 1:
        raise InputError(f"trust gate: quantile {quantile} must lie in (0, 1]")
    if not 2 <= reference_size <= MAX_REFERENCE:
        raise InputError(f"trust gate: reference_size {reference_size} must lie in [2, {MAX_REFERENCE}]")
    groups = groups or {}
    sizes = [len(pool) for pools in [held_out_pools, *(pools for _, pools in groups.values())] for pool in pools]
    if not held_out_pools or any(not pools for _, pools in groups.values()) or min(sizes) < 2:
        raise InputError(f"trust gate: calibration needs held-out pools of at least 2 rows each, got sizes {sizes}")
    rng = np.random.default_rng(seed)
    reference = _reference_sample(reference_embeddings, reference_size, rng)
    gate = TrustGate(
        reference=reference.astype(np.float32),
        threshold=0.0,
        fallback=check_fallback(fallback),
        pool_size=min(min(sizes), MAX_POOL),
        bandwidth=median_bandwidth(reference),
    )
    threshold, calibration = _calibrated(gate, held_out_pools, quantile, seed)
    rows, made = [reference], []
    for name, (embeddings, pools) in groups.items():
        rows.append(_reference_sample(embeddings, reference_size, rng))
        group = replace(gate, reference=rows[-1].astype(np.float32), bandwidth=median_bandwidth(rows[-1]))
        group_threshold, group_calibration = _calibrated(group, pools, quantile, seed)
        made.append(ReferenceGroup(name, len(rows[-1]), group_threshold, group.bandwidth, group_calibration))
    return replace(
        gate,
        reference=np.concatenate(rows).astype(np.float32),
        threshold=threshold,
        calibration=calibration,
        groups=tuple(made),
    )


def _reference_sample(embeddings: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded sample of ``size`` rows (all of them if fewer), in store order, unit-normalised float64."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise InputError(f"trust gate: reference embeddings must be (N ≥ 2, D), got {embeddings.shape}")
    picked = np.sort(rng.choice(len(embeddings), min(size, len(embeddings)), replace=False))
    return _unit(np.asarray(embeddings[picked], dtype=np.float64))


def _calibrated(gate: TrustGate, pools: list[np.ndarray], quantile: float, seed: int) -> tuple[float, dict]:
    """The ``quantile`` of the held-out pools' statistics against the gate's (mixture) reference, and the record of
    how it was calibrated."""
    statistics = np.asarray([gate.statistic(pool, seed=seed + i) for i, pool in enumerate(pools)])
    calibration = {
        "quantile": float(quantile),
        "pools": len(statistics),
        "median": float(np.median(statistics)),
        "max": float(statistics.max()),
        "seed": int(seed),
    }
    return float(np.quantile(statistics, quantile)), calibration
