"""The geometries selectors and classifiers measure embeddings in (numpy only).

``cosine`` compares directions: rows are L2-normalised, as the few-shot classifiers compare them. ``euclidean``
keeps the norm: raw rows, nothing rescaled. Both measure squared Euclidean distances between the rows
:func:`geometry_rows` prepares, so one selector serves either geometry.
"""

from __future__ import annotations

import numpy as np

from xsel.errors import InputError

LARGE_POOL = 10_000  # above this, selectors that need neighbours or medoids work on a seeded subsample
GEOMETRIES = ("cosine", "euclidean")
BLOCK_BYTES = 8 * 2**20  # passes over a whole pool go in blocks of rows this large: temporaries stay small


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.maximum(row_norms(embeddings), 1e-12)[:, None].astype(np.float32)


def row_norms(embeddings: np.ndarray) -> np.ndarray:
    """Euclidean length of each row (float64), block by block: ``np.linalg.norm(axis=1)`` squares a whole copy."""
    norms = np.empty(len(embeddings))
    for start, block in row_blocks(embeddings):
        norms[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    return norms


def row_blocks(rows: np.ndarray):
    """``(start, rows[start : start + B])`` over the array, B rows making about ``BLOCK_BYTES``."""
    rows = np.asarray(rows)
    size = max(1, BLOCK_BYTES // max(1, rows[:1].nbytes))
    return ((start, rows[start : start + size]) for start in range(0, len(rows), size))


def check_geometry(geometry: str) -> str:
    """``geometry`` itself when xsel knows it, else an input error naming the ones it knows."""
    if geometry not in GEOMETRIES:
        raise InputError(f"geometry {geometry!r} is not one of {', '.join(GEOMETRIES)}")
    return geometry


def geometry_rows(embeddings: np.ndarray, geometry: str) -> np.ndarray:
    """Rows as ``geometry`` measures them (float32): unit rows for cosine; for Euclidean the raw rows minus their
    mean, which changes no distance (nor k-means) but keeps float32's precision where all rows share an offset."""
    if check_geometry(geometry) == "cosine":
        return unit_rows(embeddings)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not len(embeddings):
        return embeddings
    return embeddings - embeddings.mean(axis=0, dtype=np.float64).astype(np.float32)  # no float64 copy of the rows


class PoolDistances:
    """Squared distances, as :func:`squared_distances` measures them between :func:`geometry_rows`, from a pool's
    rows to any points — without the transformed (N, D) copy ``geometry_rows`` makes, so a selector's memory stays
    near the pool's own (a million 512-d rows are 2 GB). Keeps one number per row: the inverse norm (cosine) or the
    squared distance to the pool's mean (Euclidean); passes over the pool go block by block."""

    def __init__(self, embeddings: np.ndarray, geometry: str):
        self.geometry = check_geometry(geometry)
        self.rows = np.asarray(embeddings, dtype=np.float32)
        n, dim = self.rows.shape
        self.mean = np.zeros(dim)
        if geometry == "euclidean" and n:
            self.mean = np.sum([block.sum(axis=0, dtype=np.float64) for _, block in row_blocks(self.rows)], axis=0) / n
        self.per_row = np.empty(n)  # 1/‖x‖ (cosine) or ‖x − mean‖² (Euclidean)
        for start, block in row_blocks(self.rows):
            if geometry == "cosine":
                self.per_row[start : start + len(block)] = 1.0 / np.maximum(row_norms(block), 1e-12)
            else:
                centred = block - self.mean.astype(np.float32)
                self.per_row[start : start + len(block)] = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.rows)

    def points(self, indices) -> np.ndarray:
        """Rows as :func:`geometry_rows` would give them (float32): unit rows, or rows minus the pool's mean."""
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if self.geometry == "cosine":
            return (self.rows[indices] * self.per_row[indices, None]).astype(np.float32)
        return (self.rows[indices] - self.mean).astype(np.float32)

    def centre(self) -> np.ndarray:
        """The mean of the rows as :meth:`points` gives them (the mean unit row; zero for Euclidean rows)."""
        if self.geometry == "euclidean" or not len(self.rows):
            return np.zeros(self.rows.shape[1], dtype=np.float32)
        total = sum(
            (block * self.per_row[start : start + len(block), None]).sum(axis=0, dtype=np.float64)
            for start, block in row_blocks(self.rows)
        )
        return (total / len(self.rows)).astype(np.float32)

    def squared_to(self, points: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        """(rows, m) float64 squared distances from the pool's rows (all, or ``indices``) to ``points`` given as
        :meth:`points` gives them."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float32))
        if indices is None:
            return np.concatenate(
                [self._squared_to(block, slice(s, s + len(block)), points) for s, block in row_blocks(self.rows)]
                or [np.zeros((0, len(points)))]
            )
        indices = np.asarray(indices, dtype=np.int64)
        return self._squared_to(self.rows[indices], indices, points)

    def _squared_to(self, block: np.ndarray, where, points: np.ndarray) -> np.ndarray:
        if self.geometry == "cosine":
            products = (block @ points.T).astype(np.float64)
            return np.maximum(2.0 - 2.0 * products * self.per_row[where, None], 0.0)
        # ‖(x − m) − p‖² = ‖x − m‖² + ‖p‖² − 2·(x − m)·p, the block centred (at most BLOCK_BYTES, or a gathered copy)
        products = ((block - self.mean.astype(np.float32)) @ points.T).astype(np.float64)
        squared = np.einsum("ij,ij->i", points, points, dtype=np.float64)
        return np.maximum(self.per_row[where, None] + squared[None, :] - 2.0 * products, 0.0)


def squared_distances(a: np.ndarray, b: np.ndarray, geometry: str = "cosine") -> np.ndarray:
    """Squared Euclidean distances between rows of :func:`geometry_rows`, clipped at 0: 2 − 2·cos between unit
    rows (cosine), ‖a‖² + ‖b‖² − 2·a·b between raw ones (Euclidean)."""
    products = a @ b.T
    if geometry == "cosine":
        return np.maximum(2.0 - 2.0 * products, 0.0)
    check_geometry(geometry)
    a_norms, b_norms = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    return np.maximum(a_norms[:, None] + b_norms[None, :] - 2.0 * products, 0.0)


def distance_name(geometry: str) -> str:
    """How reasons name the distance of a geometry: ``cosine distance`` or ``Euclidean distance``."""
    return {"cosine": "cosine distance", "euclidean": "Euclidean distance"}[check_geometry(geometry)]


def describe_distance(squared: float, geometry: str) -> str:
    """A squared distance as a reason states it: ``cosine distance 0.206`` (1 − cos) or ``Euclidean distance
    4.517``."""
    value = squared / 2 if geometry == "cosine" else np.sqrt(squared)
    return f"{distance_name(geometry)} {value:.3f}"


def cluster_labels(points: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Seeded k-means cluster of each row (n_init 3; mini-batch above ``LARGE_POOL`` rows), for the report's
    clusters, adaptation's pseudo-conditions and the trust gate's references. sklearn is imported here, on call:
    a site that only checks pools never loads it."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n_clusters, state = max(1, min(n_clusters, len(points))), seed % 2**32  # sklearn takes seeds below 2³²
    if len(points) > LARGE_POOL:
        return MiniBatchKMeans(n_clusters=n_clusters, random_state=state, n_init=3, batch_size=4096).fit_predict(points)
    return KMeans(n_clusters=n_clusters, random_state=state, n_init=3).fit_predict(points)


def subsample(n: int, seed: int, limit: int = LARGE_POOL) -> np.ndarray:
    """All ``n`` rows, or a seeded sorted sample of ``limit`` of them when there are more."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, limit, replace=False))
