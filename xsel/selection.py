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
from xsel.errors import InputError, XselError
from xsel.io.table import PATH_COLUMN, read_csv_checked
from xsel.labels import first_image_per_patient, patient_ids
from xsel.store import Store, read_store

SELECTION_COLUMNS = ("rank", PATH_COLUMN, "score", "selector")


@dataclass
class Selection:
    """The chosen rows in priority order (``table``) plus the notes a user should read (``warnings``)."""

    table: pd.DataFrame
    pool_size: int
    warnings: list[str] = field(default_factory=list)


def check_finite(store: Store) -> None:
    """Refuse embeddings with NaN or infinite values, naming the first rows."""
    bad = np.flatnonzero(~np.isfinite(store.embeddings).all(axis=1))
    if len(bad):
        named = ", ".join(f"row {i} ({store.paths[i]})" for i in bad[:3])
        raise InputError(f"{store.path}: {len(bad)} embeddings hold NaN or infinite values: {named}; re-embed them")


def create_selector(name: str, **options):
    """Instantiate a selector plugin by name (or alias); options it does not take are an input error."""
    entry = plugins.get("selector", name)
    unknown = [key for key in options if key not in factory_options(entry.factory)]
    if unknown:
        hints = [OPTION_HINTS.get(key, f"{key} is not one of its options") for key in unknown]
        raise InputError(f"selector {entry.name!r} takes no {', '.join(unknown)}: {'; '.join(hints)}")
    return entry.factory(**options)


OPTION_HINTS = {
    "checkpoint": "checkpoints are for learned selectors (medselect)",
    "model": "--model is for the selectors that read a classifier (uncertainty, boostmis)",
    "label": "--label picks one label of a classifier (uncertainty, boostmis)",
}


def factory_options(factory) -> set[str]:
    """The keyword options a selector factory takes."""
    import inspect

    return set(inspect.signature(factory).parameters)


def takes_model(name: str) -> bool:
    """Whether a selector reads a classifier (a ``model`` option): uncertainty, boostmis, or a plugin's own."""
    return "model" in factory_options(plugins.get("selector", name).factory)


def parse_selector_spec(spec: str) -> tuple[str, str, dict]:
    """``NAME`` or ``NAME=FILE`` → (label, registered name, factory options). FILE is the ``model`` of a
    selector that reads a classifier, else the ``checkpoint`` of a learned selector."""
    name, _, path = spec.partition("=")
    primary = plugins.get("selector", name.strip()).name
    if not path:
        return primary, primary, {}
    return primary, primary, {"model" if takes_model(primary) else "checkpoint": path.strip()}


def describe_identity(identity: dict) -> str:
    """An encoder identity in words: name, the start of the weights hash, and the preprocessing."""
    weights = str(identity.get("weights_sha256"))[:12]
    return f"{identity.get('encoder')} (weights {weights}…, preprocessing {identity.get('preprocessing')})"


def check_identity(selector, name: str, store: Store) -> None:
    """A learned selector, or a classifier a selector reads, only fits embeddings of the encoder it was trained
    on: refuse others, naming both."""
    expected = getattr(selector, "encoder_identity", None)
    if expected is None:
        return
    found = store.encoder_identity
    if found != expected:
        trained = "its classifier was" if hasattr(selector, "classifier") else "it was"
        raise InputError(
            f"selector {name!r}: {trained} trained on embeddings of {describe_identity(expected)} but {store.path} "
            f"was made by {describe_identity(found)}; embed with the same encoder or train on this store"
        )


def run_selector(selector, name: str, embeddings: np.ndarray, k: int, *, seed: int, metadata=None) -> np.ndarray:
    """Call a selector and hold it to the contract: ``min(k, N)`` distinct in-range integer indices."""
    return checked_picks(selector.select(embeddings, k, seed=seed, metadata=metadata), name, len(embeddings), k)


def checked_picks(picks, name: str, pool: int, k: int) -> np.ndarray:
    """Hold a selector's picks to the contract: ``min(k, pool)`` distinct in-range integer indices."""
    picks = np.asarray(picks)
    expected = min(k, pool)
    if (
        picks.ndim != 1
        or len(picks) != expected
        or not np.issubdtype(picks.dtype, np.integer)
        or len(np.unique(picks)) != len(picks)
        or (len(picks) and (picks.min() < 0 or picks.max() >= pool))
    ):
        raise XselError(
            f"selector {name!r} broke the selector contract (expected {expected} distinct row indices, "
            f"got {picks[:10]!r}); report it to the plugin's author"
        )
    return picks.astype(np.int64)


def selection_scores(selector, embeddings: np.ndarray, metadata, seed: int) -> np.ndarray:
    """The score a selector gives each pool row (NaN when it has none); seeded scores get the seed."""
    if not hasattr(selector, "scores"):
        return np.full(len(embeddings), np.nan)
    import inspect

    seeded = "seed" in inspect.signature(selector.scores).parameters
    return np.asarray(selector.scores(embeddings, metadata, **({"seed": seed} if seeded else {})))


def excluded_paths(exclude_csv: str | Path) -> set[str]:
    """Paths already labelled: the ``Path`` column of a CSV (a selection CSV works as is)."""
    frame = read_csv_checked(exclude_csv)
    return set(frame[PATH_COLUMN].dropna().astype(str))


def pool_rows(store: Store, *, exclude: set[str] | None = None, allow_same_patient: bool = False) -> np.ndarray:
    """Store rows eligible for selection: one per patient (its first row) unless allowed, then without the
    excluded images — and, under the patient rule, without any patient who already has a labelled image."""
    rows = np.arange(len(store))
    patients = patient_ids(store.meta)
    if not allow_same_patient:
        rows = first_image_per_patient(patients, rows)
    if exclude:
        labelled = {i for i, path in enumerate(store.paths) if path in exclude}
        labelled_patients = (
            {patients[i] for i in labelled} - {None} if patients is not None and not allow_same_patient else set()
        )
        rows = rows[[r not in labelled and (patients is None or patients[r] not in labelled_patients) for r in rows]]
    return rows


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
