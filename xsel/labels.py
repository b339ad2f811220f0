"""Labels as stored: CheXpert columns (1 positive, 0 negative, -1 uncertain, blank unknown) or NIH ``Finding Labels``.

Stores keep labels raw; the commands that read them apply the uncertain-label policy here. Array
contract: :func:`condition_labels` returns float64 with 1.0, 0.0 or NaN (unknown / ignored).
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from xsel.constraints import present
from xsel.errors import InputError

UNCERTAIN_POLICIES = ("positive", "negative", "ignore")
FINDING_LABELS = "Finding Labels"
NIH_SEPARATOR = "|"
PATIENT_COLUMN = "PatientID"


def _is_label_column(values: pd.Series) -> bool:
    if not pd.api.types.is_numeric_dtype(values):
        return False
    present = values.dropna().unique()
    return len(present) > 0 and set(present.tolist()) <= {-1.0, 0.0, 1.0} and (present == 1).any()


def available_conditions(meta: pd.DataFrame) -> list[str]:
    """Label columns (values within 1/0/-1/blank, at least one positive) plus findings named in ``Finding Labels``."""
    conditions = [str(c) for c in meta.columns if _is_label_column(meta[c])]
    if FINDING_LABELS in meta.columns:
        findings = meta[FINDING_LABELS].dropna().astype(str).str.split(NIH_SEPARATOR, regex=False).explode()
        conditions += sorted({f.strip() for f in findings if f.strip()} - set(conditions))
    return conditions


def condition_labels(meta: pd.DataFrame, condition: str, *, uncertain: str = "positive") -> np.ndarray:
    """One condition as 1.0 / 0.0 / NaN per row, with ``uncertain`` deciding what -1 becomes."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"--uncertain {uncertain}: choose one of {', '.join(UNCERTAIN_POLICIES)}")
    if condition in meta.columns and _is_label_column(meta[condition]):
        values = meta[condition].to_numpy(dtype=np.float64, copy=True)
        values[values == -1] = {"positive": 1.0, "negative": 0.0, "ignore": np.nan}[uncertain]
        return values
    if FINDING_LABELS in meta.columns:
        findings = meta[FINDING_LABELS].astype(object)
        known = findings.notna().to_numpy()
        has = findings.fillna("").astype(str).map(lambda s: condition in {f.strip() for f in s.split(NIH_SEPARATOR)})
        if has.any():
            return np.where(known, has.to_numpy(dtype=np.float64), np.nan)
    available = available_conditions(meta)
    if not available:
        raise InputError(
            "the store carries no label columns (CheXpert 1/0/-1 columns or 'Finding Labels'); "
            "embed a CSV that has labels to evaluate or train"
        )
    raise InputError(f"unknown condition {condition!r}; label columns in this store: {', '.join(available)}")


def patient_ids(meta: pd.DataFrame) -> np.ndarray | None:
    """``PatientID`` as strings (blank → None), or None when the store has no such column."""
    if PATIENT_COLUMN not in meta.columns:
        return None
    column = meta[PATIENT_COLUMN]
    return np.asarray([str(v) if present(v) else None for v in column], dtype=object)  # blank IDs: no patient


def split_by_patient(patients: list[str | None], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of training and validation images; every patient (or image without one) is on one side.

    Patients are ordered by a seeded CRC32 hash and the first ``round(fraction · patients)`` (at least one,
    never all) go to validation, so the split is reproducible and independent of row order. Classifier and
    selector training both hold out their validation patients with it.
    """
    if not 0 < fraction < 1:
        raise InputError(f"--val-fraction {fraction}: use a number between 0 and 1, e.g. 0.2")
    keys = [f"row:{i}" if patient is None else f"id:{patient}" for i, patient in enumerate(patients)]
    unique = sorted(set(keys), key=lambda key: (zlib.crc32(f"{seed}:{key}".encode()), key))
    if len(unique) < 2:
        raise InputError(
            f"the {len(keys)} images belong to one patient; a validation split needs images of at least two patients"
        )
    held_out = set(unique[: min(max(1, round(fraction * len(unique))), len(unique) - 1)])
    val = np.asarray([i for i, key in enumerate(keys) if key in held_out], dtype=np.int64)
    train = np.asarray([i for i, key in enumerate(keys) if key not in held_out], dtype=np.int64)
    assert not {keys[i] for i in train} & {keys[i] for i in val}, "a patient is on both sides of the split"
    return train, val
