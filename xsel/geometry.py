"""Cosine geometry shared by selectors and classifiers (numpy only)."""

from __future__ import annotations

import numpy as np

LARGE_POOL = 10_000  # above this, selectors that need neighbours or medoids work on a seeded subsample


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between unit rows: 2 − 2·cos, clipped at 0."""
    return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)


def subsample(n: int, seed: int, limit: int = LARGE_POOL) -> np.ndarray:
    """All ``n`` rows, or a seeded sorted sample of ``limit`` of them when there are more."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 1]).choice(n, limit, replace=False))
