"""Cosine geometry shared by selectors and classifiers (numpy only)."""

from __future__ import annotations

import numpy as np


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between unit rows: 2 − 2·cos, clipped at 0."""
    return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)
