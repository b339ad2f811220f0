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


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


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
    return (embeddings - embeddings.mean(axis=0, dtype=np.float64)).astype(np.float32)


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


def subsample(n: int, seed: int, limit: int = LARGE_POOL) -> np.ndarray:
    """All ``n`` rows, or a seeded sorted sample of ``limit`` of them when there are more."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, limit, replace=False))
