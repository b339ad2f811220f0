"""``xsel select`` as a library call: a store's pool → K rows to label, as a selection table.

The framework, not each selector, applies the shared rules (:mod:`xsel.constraints`): rows listed in ``exclude``
leave the pool, then the pool keeps one image per patient (or study, or every image), near-duplicates are merged
with ``dedup``, and ``balance``/``quotas`` split K over strata that the selector fills one by one — so every
selector, the site's ONNX one included, honours them without special cases. Each pick carries a one-line reason
(the selector's own when it offers ``select_with_reasons``) and the selection keeps a record of what the rules
did, for its certificate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import plugins
from xsel.certificate import input_record
from xsel.constraints import UNIT_COLUMNS, Constraints, duplicate_groups, interleave, plan_strata, stratum_seed
from xsel.errors import InputError
from xsel.io.table import PATH_COLUMN
from xsel.selectors import (
    check_identity,
    create_selector,
    excluded_paths,
    explained_picks,
    factory_options,
    gated,
    pool_rows,
)
from xsel.store import ROW_CHUNK, Store, check_distinct_paths, check_finite, read_store

SELECTION_COLUMNS = ("rank", PATH_COLUMN, "score", "selector", "reason")


@dataclass
class Selection:
    """The chosen rows in priority order (``table``), the notes a user should read (``warnings``), and what the
    pool rules and strata did (``record``: for the selection's certificate and report)."""

    table: pd.DataFrame
    pool_size: int
    warnings: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    # the rows of ``store`` selected from; when select read the file itself, ``store`` holds the pool's rows only
    # (cut down in place, see _only_the_pool), so index it, not a fresh read of the file, with ``pool``
    pool: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    store: Store | None = None


def select(
    store: str | Path | Store,
    k: int,
    *,
    selector: str | object | None = None,
    checkpoint: str | Path | None = None,
    model: str | Path | object | None = None,
    label: str | None = None,
    seed: int = 0,
    exclude: str | Path | None = None,
    allow_same_patient: bool = False,
    constraints: Constraints | None = None,
    trust_gate: bool = True,
) -> Selection:
    """Pick ``k`` rows of the store to label; K above the pool selects the whole pool with a warning.

    ``selector`` is a plugin name — by default ``medselect`` when a ``checkpoint`` is given, ``uncertainty``
    when a ``model`` (a classifier.pt, its run folder or a loaded ``Classifier``) is, else ``typiclust`` — or
    a ready selector object with a ``name`` (the site runtime passes its ONNX selector). ``checkpoint``,
    ``model`` and ``label`` become the selector's options; one it does not take is an input error.
    ``constraints`` (one image per patient/study, dedup, balance, quotas) default to one image per patient, or
    every image with ``allow_same_patient``. ``trust_gate``: a learned selector carrying a trust gate
    (:mod:`xsel.trust`) hands a pool unlike its training pools to its fallback heuristic, with a warning; the
    verdict is the record's ``fallback`` (None when no gate was checked) and the table's ``selector`` names who picked.
    """
    if k < 1:
        raise InputError(f"--k {k}: choose at least 1 image")
    store_file = store if not isinstance(store, Store) else None
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    check_distinct_paths(store)
    if constraints is None:
        constraints = Constraints(one_per="image" if allow_same_patient else "patient")
    elif allow_same_patient and constraints.one_per != "image":
        raise InputError(f"allow_same_patient and one_per={constraints.one_per!r} contradict each other; keep one")
    name, instance = _selector(selector, checkpoint, model, label)
    check_identity(instance, name, store)
    if getattr(instance, "uses_labels", False):
        raise InputError(f"selector {name!r} picks with the labels; it is for `xsel evaluate` only")
    rows, warnings, record = _pool(store, exclude, constraints)
    if store_file is not None:  # select's own copy of the file: the pool moves to the front of it, not beside it
        store, rows = _only_the_pool(store, rows), np.arange(len(rows))
    inputs = {  # hashed once every file has been read, so a missing one is the reader's one-line error
        "store": input_record(store_file),
        "exclude": input_record(exclude),
        "checkpoint": input_record(checkpoint, default_name="selector.pt"),
        "model": input_record(model if isinstance(model, (str, Path)) else None, default_name="classifier.pt"),
    }
    if k > len(rows):
        warnings.append(f"--k {k} is larger than the pool ({len(rows)} images): selecting the whole pool")
    learned = name  # the certificate names the selector asked for; the gate may hand the pool to another
    instance, name, verdict = gated(instance, name, _pool_embeddings(store, rows), seed=seed, use_gate=trust_gate)
    if verdict is not None and verdict.fired:
        warnings.append(f"trust gate of {learned}: {verdict.message}")
    plan = plan_strata(store.meta.iloc[rows].reset_index(drop=True), k, constraints)
    if plan is None:
        positions, scores, reasons = _run(instance, name, store, rows, k, seed)
    else:
        positions, scores, reasons = _run_strata(instance, name, store, rows, plan, seed)
        warnings += plan.notes
        record["strata"] = [
            {"stratum": "/".join(key), "pool": len(members), "wanted": round(want, 2), "picked": target}
            for key, members, want, target in zip(plan.keys, plan.rows, plan.wanted, plan.targets, strict=True)
        ]
        shortfalls = plan.shortfalls()
        if shortfalls:
            record["shortfalls"] = shortfalls
            warnings.append(f"quotas not met, the pool is too small: {'; '.join(shortfalls)}")
    chosen = rows[positions]
    table = pd.DataFrame(
        {"rank": np.arange(1, len(chosen) + 1), PATH_COLUMN: [store.paths[i] for i in chosen], "score": scores}
    )
    table["selector"] = name
    table["reason"] = reasons
    carried = store.meta.iloc[chosen].reset_index(drop=True)
    table = pd.concat([table, carried.drop(columns=[c for c in carried.columns if c in SELECTION_COLUMNS])], axis=1)
    record |= {
        "mode": "store",
        "inputs": inputs,
        "encoder": store.encoder_identity,
        "selector": learned,
        "selector_options": ({"label": label} if label is not None else {}) | {"trust_gate": trust_gate},
        "fallback": verdict.to_record() if verdict is not None else None,
        "k": k,
        "seed": seed,
        "constraints": constraints.to_dict(),
    }
    return Selection(table=table, pool_size=len(rows), warnings=warnings, record=record, pool=rows, store=store)


def _selector(selector, checkpoint, model, label) -> tuple[str, object]:
    """(registered name, selector object) from a name (or the default the options imply) or a ready object."""
    if selector is not None and not isinstance(selector, str):
        return selector.name, selector
    options = {
        key: value
        for key, value in (("checkpoint", checkpoint), ("model", model), ("label", label))
        if value is not None
    }
    default = "medselect" if checkpoint else "uncertainty" if model is not None else "typiclust"
    name = plugins.get("selector", selector or default).name
    if checkpoint is None and "checkpoint" in factory_options(plugins.get("selector", name).factory):
        raise InputError(
            f"selector {name!r} is learned and needs its checkpoint: add --checkpoint RUN/selector.pt "
            "(made by `xsel train selector`)"
        )
    return name, create_selector(name, **options)


def _pool(store: Store, exclude, constraints: Constraints) -> tuple[np.ndarray, list[str], dict]:
    """The store rows a selector may pick from after ``--exclude``, the one-per rule and dedup; the warnings and
    the record of what each rule removed."""
    warnings = []
    excluded = excluded_paths(exclude) if exclude is not None else set()
    unknown = excluded - set(store.paths)
    if unknown:
        warnings.append(f"{len(unknown)} paths of {exclude} are not in the store (e.g. {sorted(unknown)[0]!r})")
    rows = pool_rows(store, exclude=excluded, one_per=constraints.one_per)
    if len(rows) == 0:
        raise InputError(f"{store.path}: no images left to select from after --exclude")
    labelled = len(excluded & set(store.paths))
    record = {"store_rows": len(store), "excluded": labelled, "removed_by_one_per": len(store) - labelled - len(rows)}
    if record["removed_by_one_per"] > 0:
        unit = UNIT_COLUMNS[constraints.one_per]
        warnings.append(f"kept one image per {unit}: the pool has {len(rows)} of {len(store)} images")
    if constraints.dedup is not None:
        # labelled images join the grouping: a copy of an image labelled in an earlier round leaves the pool too
        labelled_rows = np.asarray([i for i, path in enumerate(store.paths) if path in excluded], dtype=np.int64)
        candidates = np.concatenate([labelled_rows, rows])
        groups = duplicate_groups(store.embeddings[candidates], constraints.dedup)
        dropped = {int(row) for group in groups for row in candidates[group[1:]]}
        record["duplicate_groups"] = [[store.paths[i] for i in candidates[group]] for group in groups]
        record["removed_by_dedup"] = len(dropped)
        rows = np.asarray([row for row in rows if int(row) not in dropped], dtype=np.int64)
        if groups:
            warnings.append(
                f"--dedup {constraints.dedup}: {len(groups)} groups of near-duplicates, {len(dropped)} images left "
                "out (each group keeps its first image)"
            )
    record["pool"] = len(rows)
    return rows, warnings, record


def _only_the_pool(store: Store, rows: np.ndarray) -> Store:
    """The store cut down to ``rows`` (ascending store rows), moved to the front of its own embeddings array in place:
    a pool that is most of a large store (after ``--exclude`` or the patient rule) is not copied beside it (a million
    512-d rows are 2 GB). Only for a store ``select`` read itself: a caller's Store is never modified."""
    if len(rows) == len(store):
        return store
    if np.any(np.diff(rows) <= 0):
        raise ValueError("_only_the_pool needs ascending store rows")  # the in-place move relies on it
    embeddings = store.embeddings
    for start in range(0, len(rows), ROW_CHUNK):  # rows[i] ≥ i: no row is overwritten before it is moved
        block = rows[start : start + ROW_CHUNK]
        embeddings[start : start + len(block)] = embeddings[block]
    meta = store.meta.iloc[rows].reset_index(drop=True)
    return Store(store.path, embeddings[: len(rows)], [store.paths[i] for i in rows], meta, store.attrs)


def _pool_embeddings(store: Store, rows: np.ndarray) -> np.ndarray:
    """The pool's embeddings (store rows in store order). A pool of the whole store is the store's own array, not a
    copy (a million 512-d rows are 2 GB)."""
    whole = len(rows) == len(store) and (len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(store) - 1))
    return store.embeddings if whole else store.embeddings[rows]


def _run(instance, name: str, store: Store, rows: np.ndarray, k: int, seed: int):
    """The selector on one pool (store rows in store order): positions in ``rows``, scores, reasons."""
    embeddings = _pool_embeddings(store, rows)
    return explained_picks(instance, name, embeddings, k, seed=seed, metadata=store.meta.iloc[rows])


def _run_strata(instance, name: str, store: Store, rows: np.ndarray, plan, seed: int):
    """The selector on each stratum's pool for its share of K, interleaved into one priority order. Each stratum
    draws with its own seed (derived from the seed and its key), so equal strata do not pick the same positions."""
    ranked, targets, scores, reasons = [], [], {}, {}
    for key, members, target in zip(plan.keys, plan.rows, plan.targets, strict=True):
        if target == 0:
            continue
        picks, stratum_scores, stratum_reasons = _run(
            instance, name, store, rows[members], target, stratum_seed(seed, key)
        )
        positions = members[picks]
        ranked.append(positions)
        targets.append(target)
        scores |= dict(zip(positions.tolist(), stratum_scores, strict=True))
        tag = f" [stratum {'/'.join(key)}]"
        reasons |= {p: why + tag for p, why in zip(positions.tolist(), stratum_reasons, strict=True)}
    order = interleave(ranked, targets)
    return order, np.asarray([scores[p] for p in order.tolist()]), [reasons[p] for p in order.tolist()]
