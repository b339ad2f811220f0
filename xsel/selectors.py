"""The selector framework: building selector plugins and holding them to the contract, and the pool rules.

Every command that runs selectors (``select``, ``evaluate``, ``train selector``, ``export``, the site runtime)
goes through here: :func:`create_selector` builds a plugin by name (options it does not take are an input
error), :func:`run_selector` checks what it returns, :func:`check_identity` refuses a learned selector on
embeddings of another encoder, :func:`gated` hands a pool a learned selector was not trained for to the heuristic
its trust gate names (:mod:`xsel.trust`), and :func:`pool_rows` applies the shared rules (``--exclude``, one image
per patient) before any selector runs.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import plugins
from xsel.constraints import UNIT_COLUMNS, one_per_unit, present
from xsel.errors import InputError, XselError
from xsel.identity import describe_identity
from xsel.io.table import PATH_COLUMN, read_csv_checked
from xsel.store import Store
from xsel.trust import check_fallback

METADATA_FEATURES = ("sex", "age", "frontal")


@dataclass(frozen=True)
class PoolFeatures:
    """What a learned selector reads per pool image: its embedding, then the named ``metadata`` features.

    Learned selectors declare these (``pool_features``) so that an exported bundle names them in its manifest
    and the site runtime prepares the same ``(N, D′)`` input without the selector's code. Metadata features
    (each 0 when unknown): ``sex`` +1 M / −1 F, ``age`` z-scored with ``age_mean``/``age_std`` (from the
    training store), ``frontal`` +1 PA/AP / −1 lateral.
    """

    metadata: tuple[str, ...] = ()
    age_mean: float = 0.0
    age_std: float = 1.0

    def __post_init__(self):
        unknown = [name for name in self.metadata if name not in METADATA_FEATURES]
        if unknown:
            raise InputError(f"unknown pool features {unknown}; xsel prepares {', '.join(METADATA_FEATURES)}")
        object.__setattr__(self, "metadata", tuple(self.metadata))

    def width(self, embedding_dim: int) -> int:
        """D′: the embedding's dimension plus one column per metadata feature."""
        return embedding_dim + len(self.metadata)

    def inputs(self, embeddings: np.ndarray, metadata: pd.DataFrame | None) -> np.ndarray:
        """The ``(N, D′)`` float32 input for one pool (rows in the order given; xsel passes store order)."""
        features = np.asarray(embeddings, dtype=np.float32)
        if not self.metadata:
            return features
        meta = metadata.reset_index(drop=True) if metadata is not None else None
        extra = metadata_features(meta, len(features), self.age_mean, self.age_std)
        columns = [METADATA_FEATURES.index(name) for name in self.metadata]
        return np.concatenate([features, extra[:, columns]], axis=1)

    def to_dict(self) -> dict:
        return {**asdict(self), "metadata": list(self.metadata)}

    @classmethod
    def from_dict(cls, record: dict) -> PoolFeatures:
        return cls(
            metadata=tuple(record.get("metadata", ())),
            age_mean=float(record.get("age_mean", 0.0)),
            age_std=float(record.get("age_std", 1.0)),
        )


def metadata_features(meta: pd.DataFrame | None, rows: int, age_mean: float, age_std: float) -> np.ndarray:
    """(rows, 3) float32: sex, z-scored age, frontal view; 0 wherever the value is unknown."""
    features = np.zeros((rows, len(METADATA_FEATURES)), dtype=np.float32)
    if meta is None:
        return features
    if "Sex" in meta.columns:
        sex = meta["Sex"].astype(str).str.upper().str[:1]
        features[:, 0] = np.select([sex == "M", sex == "F"], [1.0, -1.0], 0.0)
    if "Age" in meta.columns:
        age = pd.to_numeric(meta["Age"], errors="coerce").to_numpy(dtype=np.float64)
        features[:, 1] = np.nan_to_num((age - age_mean) / age_std, nan=0.0)
    if "View" in meta.columns:
        view = meta["View"].astype(str).str.upper()
        frontal = view.str.contains("PA|AP|FRONTAL", regex=True)
        lateral = view.str.startswith("L")
        features[:, 2] = np.select([frontal, lateral], [1.0, -1.0], 0.0)
    return features


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


def gated(selector, name: str, embeddings: np.ndarray, *, seed: int, use_gate: bool = True):
    """The selector to run on this pool: ``(selector, name, verdict)``. A selector carrying a ``trust_gate``
    (:class:`xsel.trust.TrustGate`) has it judge the pool first; when the pool lies beyond what the selector was
    trained on, the gate's fallback heuristic picks instead — unless the fallback is ``learned`` (chosen on another
    hospital, where the selector beat every heuristic): then the verdict records the unfamiliar pool and the
    selector keeps picking. ``verdict`` is None when no gate was checked (none, or ``use_gate=False``). One place
    for ``select``, ``evaluate`` and the site, so all three fall back alike."""
    gate = getattr(selector, "trust_gate", None)
    if gate is None or not use_gate:
        return selector, name, None
    verdict = gate.check(embeddings, seed=seed)
    if not verdict.fell_back:
        return selector, name, verdict
    try:
        fallback = check_fallback(gate.fallback)
    except InputError as error:
        raise InputError(f"selector {name!r}: {error}; or pass --no-trust-gate") from None
    return create_selector(fallback), fallback, verdict


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
    seeded = "seed" in inspect.signature(selector.scores).parameters
    return np.asarray(selector.scores(embeddings, metadata, **({"seed": seed} if seeded else {})))


def excluded_paths(exclude_csv: str | Path) -> set[str]:
    """Paths already labelled: the ``Path`` column of a CSV (a selection CSV works as is)."""
    frame = read_csv_checked(exclude_csv)
    return set(frame[PATH_COLUMN].dropna().astype(str))


def pool_rows(store: Store, *, exclude: set[str] | None = None, one_per: str = "patient") -> np.ndarray:
    """Store rows eligible for selection: one per patient or study (its first row) unless ``one_per="image"``,
    then without the excluded images — and without any patient (study) that already has a labelled image."""
    rows = one_per_unit(store.meta, np.arange(len(store)), one_per)
    if exclude:
        labelled = {i for i, path in enumerate(store.paths) if path in exclude}
        column = UNIT_COLUMNS.get(one_per)
        units = store.meta[column].astype(object).to_numpy() if column in store.meta.columns else None
        taken = {str(units[i]) for i in labelled if units is not None and present(units[i])}
        keep = [
            r not in labelled and (units is None or not present(units[r]) or str(units[r]) not in taken) for r in rows
        ]
        rows = rows[np.asarray(keep, dtype=bool)] if len(rows) else rows
    return rows


def explained_picks(selector, name: str, embeddings: np.ndarray, k: int, *, seed: int, metadata=None):
    """A selector's picks held to the contract, each pick's score (NaN when it has none) and a one-line reason.

    Optional selector methods, used when present: ``select_with_scores`` (picks and every row's score from one
    pass: a costly model runs once), ``select_with_reasons`` (picks and a reason per pick, e.g. "most typical image
    of cluster 3 of 20 (143 images)"). Without its own reasons a pick is described by its rank and score."""
    if hasattr(selector, "select_with_scores"):
        picks, scores = selector.select_with_scores(embeddings, k, seed=seed, metadata=metadata)
        picks = checked_picks(picks, name, len(embeddings), k)
        scores, reasons = np.asarray(scores)[picks], None
    elif hasattr(selector, "select_with_reasons"):
        picks, reasons = selector.select_with_reasons(embeddings, k, seed=seed, metadata=metadata)
        picks = checked_picks(picks, name, len(embeddings), k)
        scores = selection_scores(selector, embeddings, metadata, seed)[picks]
    else:
        picks = run_selector(selector, name, embeddings, k, seed=seed, metadata=metadata)
        scores, reasons = selection_scores(selector, embeddings, metadata, seed)[picks], None
    if reasons is None or len(reasons) != len(picks):
        reasons = [
            f"rank {rank} of {len(embeddings)} by {name}" + ("" if np.isnan(score) else f" (score {score:.4g})")
            for rank, score in enumerate(np.asarray(scores, dtype=np.float64), 1)
        ]
    return picks, scores, list(reasons)
