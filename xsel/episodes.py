"""Labeling episodes (DESIGN.md, "Evaluation protocol"), reproducible from (seed, condition, index).

For a condition, positives have label 1 and negatives are images positive for the negative column
(default "No Finding") and not positive for the condition. An episode draws the query set first —
half of each class — then the pool from the rest, never sharing a ``PatientID`` with the query, at
natural prevalence capped at half positive. Pool and query rows are kept in store order, so a pool is
always presented to a selector in the same order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from xsel.constraints import one_per_unit
from xsel.errors import InputError
from xsel.labels import condition_labels, patient_ids
from xsel.store import Store

MIN_QUERY_PER_CLASS = 5
NEGATIVE_DEFAULT = "No Finding"


@dataclass(frozen=True)
class Episode:
    """One labeling task. ``pool``/``query`` are store rows; labels are 0/1 int8 aligned with them."""

    condition: str
    index: int
    seed: int
    pool: np.ndarray
    pool_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


class EpisodeTask:
    """The candidates of one condition and the episode sizes they allow (shrunk with a warning if scarce)."""

    def __init__(
        self,
        store: Store,
        condition: str,
        *,
        negative: str = NEGATIVE_DEFAULT,
        uncertain: str = "positive",
        pool_size: int = 1000,
        query_size: int = 100,
        k: int = 20,
        allow_same_patient: bool = False,
        rows: np.ndarray | None = None,
    ):
        if query_size < 2 * MIN_QUERY_PER_CLASS:
            raise InputError(f"--query-size {query_size}: use at least {2 * MIN_QUERY_PER_CLASS}")
        if condition == negative:
            raise InputError(f"condition {condition!r} is also the negative class; choose another --negative")
        positive = condition_labels(store.meta, condition, uncertain=uncertain) == 1
        negative_mask = (condition_labels(store.meta, negative, uncertain=uncertain) == 1) & ~positive
        candidates = np.arange(len(store)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        self.patients = patient_ids(store.meta)
        if not allow_same_patient:
            candidates = one_per_unit(store.meta, candidates, "patient")  # the rule `select` applies
        self.condition = condition
        self.positives = candidates[positive[candidates]]
        self.negatives = candidates[negative_mask[candidates]]
        n_pos, n_neg = len(self.positives), len(self.negatives)
        self.query_per_class = min(query_size // 2, n_pos // 2, n_neg // 2)
        if self.query_per_class < MIN_QUERY_PER_CLASS:
            raise InputError(
                f"condition {condition!r} has {n_pos} positive and {n_neg} negative ({negative}) images"
                f"{'' if allow_same_patient else ' (one per patient)'}; episodes need at least "
                f"{2 * MIN_QUERY_PER_CLASS} of each"
            )
        self.pool_size = min(pool_size, n_pos + n_neg - 2 * self.query_per_class)
        if self.pool_size < k:
            raise InputError(
                f"condition {condition!r}: only {self.pool_size} images are left for the pool, fewer than K={k}"
            )
        shrunk = []
        if self.query_per_class < query_size // 2:
            shrunk.append(f"a query of {2 * self.query_per_class} (asked {query_size})")
        if self.pool_size < pool_size:
            shrunk.append(f"a pool of {self.pool_size} (asked {pool_size})")
        self.warning = (
            f"{condition}: {n_pos} positive / {n_neg} negative images, so episodes use {' and '.join(shrunk)}; "
            "they reuse the same images, so read this condition's CI with that in mind"
            if shrunk
            else None
        )

    def episode(self, index: int, seed: int) -> Episode:
        """Episode ``index`` of this condition; the same (seed, condition, index) gives the same episode."""
        rng = np.random.default_rng([seed, zlib.crc32(self.condition.encode()), index])
        q = self.query_per_class
        query_pos = rng.choice(self.positives, q, replace=False)
        query_neg = rng.choice(self.negatives, q, replace=False)
        query = np.sort(np.concatenate([query_pos, query_neg]))
        rest = np.setdiff1d(np.concatenate([self.positives, self.negatives]), query)
        if self.patients is not None:  # never share a patient with the query (matters with allow_same_patient)
            query_patients = {self.patients[r] for r in query} - {None}
            rest = rest[[self.patients[r] not in query_patients for r in rest]]
        shuffled = rng.permutation(rest)
        is_positive = np.isin(shuffled, self.positives)
        size = min(self.pool_size, len(shuffled))
        pool, spare = shuffled[:size], shuffled[size:]
        excess = int(is_positive[:size].sum()) - size // 2
        if excess > 0:  # cap at half positive: swap excess positives for unused negatives
            spare_negatives = spare[~is_positive[size:]][:excess]
            if len(spare_negatives):
                drop = np.flatnonzero(is_positive[:size])[-len(spare_negatives) :]
                pool = np.concatenate([np.delete(pool, drop), spare_negatives])
        pool = np.sort(pool)
        return Episode(
            condition=self.condition,
            index=index,
            seed=int(rng.integers(2**31)),
            pool=pool,
            pool_labels=np.isin(pool, self.positives).astype(np.int8),
            query=query,
            query_labels=np.isin(query, self.positives).astype(np.int8),
        )
