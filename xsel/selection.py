"""``xsel select`` as a library call: a store's pool → K rows to label, as a selection table.

The framework, not each selector, applies the shared rules: rows listed in ``exclude`` leave the pool,
then the pool keeps one image per ``PatientID`` (its first row in store order) unless
``allow_same_patient``, so every selector returns distinct patients without special cases.

A selector may offer ``select_with_scores(embeddings, k, *, seed, metadata)`` → (picks, scores of every row):
``select`` then uses it instead of ``select`` + ``scores``, so a costly model (boostmis: VAT and density) runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import plugins
from xsel.errors import InputError
from xsel.io.table import PATH_COLUMN
from xsel.selectors import (
    check_identity,
    checked_picks,
    create_selector,
    excluded_paths,
    pool_rows,
    run_selector,
    selection_scores,
)
from xsel.store import Store, check_finite, read_store

SELECTION_COLUMNS = ("rank", PATH_COLUMN, "score", "selector")


@dataclass
class Selection:
    """The chosen rows in priority order (``table``) plus the notes a user should read (``warnings``)."""

    table: pd.DataFrame
    pool_size: int
    warnings: list[str] = field(default_factory=list)


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
) -> Selection:
    """Pick ``k`` rows of the store to label; K above the pool selects the whole pool with a warning.

    ``selector`` is a plugin name — by default ``medselect`` when a ``checkpoint`` is given, ``uncertainty``
    when a ``model`` (a classifier.pt, its run folder or a loaded ``Classifier``) is, else ``typiclust`` — or
    a ready selector object with a ``name`` (the site runtime passes its ONNX selector). ``checkpoint``,
    ``model`` and ``label`` become the selector's options; one it does not take is an input error.
    """
    if k < 1:
        raise InputError(f"--k {k}: choose at least 1 image")
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    options = {
        key: value
        for key, value in (("checkpoint", checkpoint), ("model", model), ("label", label))
        if value is not None
    }
    if isinstance(selector, str) or selector is None:
        default = "medselect" if checkpoint else "uncertainty" if model is not None else "typiclust"
        name = plugins.get("selector", selector or default).name
        instance = create_selector(name, **options)
    else:
        name, instance = selector.name, selector
    check_identity(instance, name, store)
    if getattr(instance, "uses_labels", False):
        raise InputError(f"selector {name!r} picks with the labels; it is for `xsel evaluate` only")
    warnings = []
    excluded = excluded_paths(exclude) if exclude is not None else set()
    unknown = excluded - set(store.paths)
    if unknown:
        warnings.append(f"{len(unknown)} paths of {exclude} are not in the store (e.g. {sorted(unknown)[0]!r})")
    rows = pool_rows(store, exclude=excluded, allow_same_patient=allow_same_patient)
    if len(rows) == 0:
        raise InputError(f"{store.path}: no images left to select from after --exclude")
    if len(rows) < len(store) - len(excluded & set(store.paths)):
        warnings.append(f"kept one image per PatientID: the pool has {len(rows)} of {len(store)} images")
    if k > len(rows):
        warnings.append(f"--k {k} is larger than the pool ({len(rows)} images): selecting the whole pool")
    metadata, embeddings = store.meta.iloc[rows], store.embeddings[rows]
    if hasattr(instance, "select_with_scores"):
        picks, scores = instance.select_with_scores(embeddings, k, seed=seed, metadata=metadata)
        picks = checked_picks(picks, name, len(rows), k)
        scores = np.asarray(scores)[picks]
    else:
        picks = run_selector(instance, name, embeddings, k, seed=seed, metadata=metadata)
        scores = selection_scores(instance, embeddings, metadata, seed)[picks]
    chosen = rows[picks]
    table = pd.DataFrame(
        {"rank": np.arange(1, len(chosen) + 1), PATH_COLUMN: [store.paths[i] for i in chosen], "score": scores}
    )
    table["selector"] = name
    carried = store.meta.iloc[chosen].reset_index(drop=True)
    table = pd.concat([table, carried.drop(columns=[c for c in carried.columns if c in SELECTION_COLUMNS])], axis=1)
    return Selection(table=table, pool_size=len(rows), warnings=warnings)
