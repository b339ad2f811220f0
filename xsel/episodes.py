"""Labeling episodes (DESIGN.md, "Evaluation protocol"), reproducible from (seed, condition, index).

For a condition, positives have label 1 and negatives are images positive for the negative column
(default "No Finding"; several columns separated by commas, e.g. "No Finding,Normal", count as one negative
class) and not positive for the condition. An episode draws the query set first —
half of each class — then the pool from the rest, never sharing a ``PatientID`` with the query, at
natural prevalence capped at half positive (or, for training, ``balanced``: half positive where the
candidates allow). Pool and query rows are kept in store order, so a pool is
always presented to a selector in the same order.

Archive episodes (:class:`ArchiveTask`) match real use instead: query and pool are random draws of the
whole store, whatever the conditions, and the picks are labelled for every condition at once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from xsel.constraints import one_per_unit, stratum_values
from xsel.errors import InputError
from xsel.labels import available_conditions, condition_labels, patient_ids
from xsel.store import Store

MIN_QUERY_PER_CLASS = 5
VALIDATION_QUERY_PER_CLASS = 2  # a selector's validation may shrink this far for a scarce condition
NEGATIVE_DEFAULT = "No Finding"
ARCHIVE = "archive"  # the protocol's name, and the condition of its rows in an evaluation table
MIN_ARCHIVE_PER_CLASS = 2  # archive episodes label by default the columns with this many positives and negatives


def check_episodes_within(store: Store, column: str) -> None:
    """Refuse an ``--episodes-within`` column the store does not have, before any episode is drawn."""
    if column and column not in store.meta.columns:
        raise InputError(
            f"--episodes-within {column}: {store.path} has no such column; name the column of each image's hospital "
            "(e.g. Source)"
        )


def rows_of_labelling_groups(
    store: Store, condition: str, column: str, *, uncertain: str, rows: np.ndarray | None = None
) -> np.ndarray:
    """``rows`` (default: every row) whose ``column`` value (a hospital, e.g. ``Source``) has a positive for
    ``condition`` somewhere in the store. Where one source labels a condition, every other source's normals carry 0
    for it too; episodes drawn across sources would reward telling hospitals apart instead of finding the
    condition. Blank values form one group, as for ``select --balance`` strata."""
    positive = condition_labels(store.meta, condition, uncertain=uncertain) == 1
    groups = stratum_values(store.meta, column).to_numpy()
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    return rows[np.isin(groups[rows], groups[positive])]


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
        min_query_per_class: int = MIN_QUERY_PER_CLASS,
    ):
        if query_size < 2 * MIN_QUERY_PER_CLASS:
            raise InputError(f"--query-size {query_size}: use at least {2 * MIN_QUERY_PER_CLASS}")
        negatives = [name.strip() for name in negative.split(",") if name.strip()]
        if condition in negatives:
            raise InputError(f"condition {condition!r} is also the negative class; choose another --negative")
        positive = condition_labels(store.meta, condition, uncertain=uncertain) == 1
        negative_mask = np.zeros(len(store), dtype=bool)
        for name in negatives:
            negative_mask |= condition_labels(store.meta, name, uncertain=uncertain) == 1
        negative_mask &= ~positive
        candidates = np.arange(len(store)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        self.patients = patient_ids(store.meta)
        if not allow_same_patient:
            candidates = one_per_unit(store.meta, candidates, "patient")  # the rule `select` applies
        self.condition = condition
        self.positives = candidates[positive[candidates]]
        self.negatives = candidates[negative_mask[candidates]]
        n_pos, n_neg = len(self.positives), len(self.negatives)
        self.query_per_class = min(query_size // 2, n_pos // 2, n_neg // 2)
        if self.query_per_class < min_query_per_class:
            raise InputError(
                f"condition {condition!r} has {n_pos} positive and {n_neg} negative ({negative}) images"
                f"{'' if allow_same_patient else ' (one per patient)'}; episodes need at least "
                f"{2 * min_query_per_class} of each"
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

    def episode(self, index: int, seed: int, *, balanced: bool = False) -> Episode:
        """Episode ``index`` of this condition; the same (seed, condition, index) gives the same episode.
        ``balanced``: the pool is half positive where there are enough of each class (training episodes)."""
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
        if balanced:
            positives, negatives = shuffled[is_positive], shuffled[~is_positive]
            take = min(len(positives), max(size // 2, size - len(negatives)))
            shuffled = np.concatenate(
                [positives[:take], negatives[: size - take], positives[take:], negatives[size - take :]]
            )
            is_positive = np.isin(shuffled, self.positives)
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


@dataclass(frozen=True)
class ArchiveEpisode:
    """One archive labeling task. ``pool``/``query`` are store rows in store order; ``pool_labels`` and
    ``query_labels`` are float64 (rows, len(conditions)) with 1.0, 0.0 or NaN (unknown for that condition)."""

    index: int
    seed: int
    conditions: tuple[str, ...]
    pool: np.ndarray
    pool_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


class ArchiveTask:
    """Archive episodes, reproducible from (seed, index): a team labels K images of its whole archive for
    every condition at once, so query and pool are random draws of the store at its own prevalences.

    ``conditions`` empty or None: every label column with at least ``MIN_ARCHIVE_PER_CLASS`` positives and
    known negatives after the one-image-per-patient rule (a 1/blank column such as CheXpert's "No Finding"
    could never be scored); ``self.conditions`` says which.
    """

    def __init__(
        self,
        store: Store,
        conditions: list[str] | None = None,
        *,
        uncertain: str = "positive",
        pool_size: int = 1000,
        query_size: int = 100,
        k: int = 20,
        allow_same_patient: bool = False,
    ):
        if query_size < 2 * MIN_QUERY_PER_CLASS:
            raise InputError(f"--query-size {query_size}: use at least {2 * MIN_QUERY_PER_CLASS}")
        candidates = np.arange(len(store))
        self.patients = patient_ids(store.meta)
        if not allow_same_patient:
            candidates = one_per_unit(store.meta, candidates, "patient")  # the rule `select` applies
        per_patient = "" if allow_same_patient else " (one per patient)"
        if conditions:
            labels = {c: condition_labels(store.meta, c, uncertain=uncertain) for c in conditions}
        else:
            labels = {}
            for condition in available_conditions(store.meta):
                values = condition_labels(store.meta, condition, uncertain=uncertain)
                counts = [(values[candidates] == label).sum() for label in (1, 0)]
                if min(counts) >= MIN_ARCHIVE_PER_CLASS:
                    labels[condition] = values
            if not labels:
                raise InputError(
                    f"no label column of this store has {MIN_ARCHIVE_PER_CLASS} positive and {MIN_ARCHIVE_PER_CLASS} "
                    f"negative images{per_patient}; archive episodes need labelled conditions"
                )
        self.conditions = tuple(labels)
        self.labels = np.column_stack([labels[c] for c in self.conditions])
        self.candidates = candidates
        n = len(candidates)
        if n - query_size < k:
            raise InputError(
                f"the store has {n} images{per_patient}; an archive episode needs --query-size {query_size} "
                f"plus at least K={k} for the pool"
            )
        self.query_size = query_size
        self.pool_size = min(pool_size, n - query_size)
        self.warning = (
            f"{ARCHIVE}: {n} images{per_patient}, so episodes use a pool of {self.pool_size} (asked {pool_size}) "
            "and reuse the same images; read the CIs with that in mind"
            if self.pool_size < pool_size
            else None
        )

    def episode(self, index: int, seed: int) -> ArchiveEpisode:
        """Archive episode ``index``: the query first, then the pool from the rest, sharing no ``PatientID``."""
        rng = np.random.default_rng([seed, zlib.crc32(ARCHIVE.encode()), index])
        query = np.sort(rng.choice(self.candidates, self.query_size, replace=False))
        rest = np.setdiff1d(self.candidates, query)
        if self.patients is not None:  # never share a patient with the query (matters with allow_same_patient)
            query_patients = {self.patients[r] for r in query} - {None}
            rest = rest[[self.patients[r] not in query_patients for r in rest]]
        pool = np.sort(rng.choice(rest, min(self.pool_size, len(rest)), replace=False))
        return ArchiveEpisode(
            index=index,
            seed=int(rng.integers(2**31)),
            conditions=self.conditions,
            pool=pool,
            pool_labels=self.labels[pool],
            query=query,
            query_labels=self.labels[query],
        )
