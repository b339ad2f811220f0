"""The selection certificate: what a reviewer needs to trust a selection and reproduce it.

Written next to every selection CSV as ``<name>.SELECTION.json``: the xsel version, every input with its SHA-256
(store or image list, bundle, checkpoint or classifier, exclusion list), the encoder identity, the selector and the
plugin it came from, the seed, K, the constraints and what they removed (duplicate groups included), the fallback
decision (a learned selector's trust-gate verdict, :mod:`xsel.trust`; the gate's on/off setting is among the selector
options), and per pick its rank, path, SOPInstanceUID, score and one-line reason. :func:`verify` recomputes the
selection from the recorded inputs and names the first thing that differs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xsel import __version__, plugins
from xsel.constraints import Constraints
from xsel.errors import InputError
from xsel.io.atomic import write_text_atomic
from xsel.io.table import PATH_COLUMN, file_sha256, read_image_table

CERTIFICATE_SCHEMA = 1
SCORE_TOLERANCE = 1e-4  # ONNX and PyTorch agree to this (the bundle's parity check)


def certificate_path(selection_csv: str | Path) -> Path:
    """``to_label.csv`` → ``to_label.SELECTION.json``, beside it."""
    selection_csv = Path(selection_csv)
    return selection_csv.with_name(f"{selection_csv.stem}.SELECTION.json")


def input_record(path: str | Path | None, *, default_name: str | None = None) -> dict | None:
    """A file the selection read, by path (absolute, so verification works from anywhere) and SHA-256. A run folder
    stands for its ``default_name`` file (``selector.pt``); a folder of images is recorded by path, its listing is
    hashed by the caller (``ImageTable.source_sha256``)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir() and default_name is not None and (path / default_name).is_file():
        path = path / default_name
    if path.is_dir():
        return {"path": str(path.resolve()), "sha256": None}
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def write_certificate(selection, selection_csv: str | Path) -> Path:
    """Write the certificate of ``selection`` (a :class:`xsel.selection.Selection` whose CSV is ``selection_csv``)."""
    record = selection.record
    registration = plugins.registry("selector").get(record["selector"])
    source = record.get("selector_source") or {  # a bundle's selector came from the bundle, not from this install
        "plugin": registration.plugin if registration else None,
        "distribution": registration.distribution if registration else None,
        "version": registration.version if registration else None,
    }
    table = selection.table
    sop = table["SOPInstanceUID"] if "SOPInstanceUID" in table.columns else pd.Series([None] * len(table))
    picks = [
        {
            "rank": int(row["rank"]),
            "path": row[PATH_COLUMN],
            "SOPInstanceUID": None if pd.isna(uid) else str(uid),
            "score": None if pd.isna(row["score"]) else float(row["score"]),
            "reason": row["reason"],
        }
        for (_, row), uid in zip(table.iterrows(), sop, strict=True)
    ]
    certificate = {
        "schema_version": CERTIFICATE_SCHEMA,
        "xsel_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": record.get("mode", "store"),
        "inputs": record.get("inputs", {}),
        "encoder": record.get("encoder"),
        "selector": {"name": record["selector"], **source, "options": record.get("selector_options", {})},
        "seed": record["seed"],
        "k": record["k"],
        "constraints": record["constraints"],
        "pool": {
            key: record[key]
            for key in ("store_rows", "excluded", "removed_by_one_per", "removed_by_dedup", "pool", "duplicate_groups")
            if key in record
        },
        "strata": record.get("strata"),
        "shortfalls": record.get("shortfalls", []),
        "fallback": record.get("fallback"),
        "warnings": list(selection.warnings),
        "selection": input_record(selection_csv),
        "picks": picks,
    }
    return write_text_atomic(json.dumps(certificate, indent=2, default=_json_default), certificate_path(selection_csv))


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`: ``differences`` is empty when the selection was reproduced."""

    certificate: Path
    picks: int
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def read_certificate(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: certificate not found; `xsel select` writes <selection>.SELECTION.json")
    try:
        certificate = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not valid JSON; pass the SELECTION.json that `xsel select` wrote") from None
    if not isinstance(certificate, dict) or certificate.get("schema_version") != CERTIFICATE_SCHEMA:
        raise InputError(f"{path}: not an xsel selection certificate (schema {CERTIFICATE_SCHEMA})")
    return certificate


def verify(path: str | Path, *, show_progress: bool = False) -> Verification:
    """Check every recorded input's SHA-256, recompute the selection, compare it pick by pick."""
    certificate = read_certificate(path)
    differences = _changed_inputs(certificate)
    if not differences:
        differences = _compare(certificate, _recompute(certificate, show_progress))
    return Verification(Path(path), len(certificate["picks"]), differences)


def _changed_inputs(certificate: dict) -> list[str]:
    """Inputs that are gone or changed since the selection, and a selection CSV edited after it was written."""
    changed = []
    records = {**certificate["inputs"], "selection": certificate.get("selection")}
    for name, record in records.items():
        if record and record.get("listing_sha256"):  # a folder of images: its scanned listing
            listing = read_image_table(record["path"], show_progress=False).source_sha256
            if listing != record["listing_sha256"]:
                changed.append(f"{name} {record['path']} changed since the selection (its images or their tags)")
        if not record or record.get("sha256") is None:
            continue
        path = Path(record["path"])
        if not path.is_file():
            changed.append(f"{name} {path} is missing")
        elif file_sha256(path) != record["sha256"]:
            changed.append(f"{name} {path} changed since the selection (SHA-256 {record['sha256'][:12]}… expected)")
    return changed


def _recompute(certificate: dict, show_progress: bool):
    inputs = certificate["inputs"]
    constraints = Constraints.from_dict(certificate["constraints"])
    options = certificate["selector"]["options"]
    exclude = inputs.get("exclude", {}) or {}
    if certificate["mode"] == "site":
        from xsel.site import site_select

        store = inputs.get("site_store") or {}
        with tempfile.TemporaryDirectory() as scratch:
            return site_select(
                inputs["images"]["path"],
                Path(inputs["bundle"]["path"]).parent,  # the manifest, which holds every model's SHA-256
                certificate["k"],
                out=Path(scratch) / "verify.csv",
                selector=options.get("selector"),
                store=store.get("path"),
                image_root=options.get("image_root"),
                seed=certificate["seed"],
                exclude=exclude.get("path"),
                constraints=constraints,
                show_progress=show_progress,
                trust_gate=options.get("trust_gate", True),
            )
    from xsel.selection import select

    if not inputs.get("store"):
        raise InputError("this selection was made from a store held in memory (a notebook); it cannot be recomputed")
    model = inputs.get("model") or {}
    checkpoint = inputs.get("checkpoint") or {}
    return select(
        inputs["store"]["path"],
        certificate["k"],
        selector=certificate["selector"]["name"],
        checkpoint=checkpoint.get("path"),
        model=model.get("path"),
        label=options.get("label"),
        seed=certificate["seed"],
        exclude=exclude.get("path"),
        constraints=constraints,
        trust_gate=options.get("trust_gate", True),
    )


def _compare(certificate: dict, selection) -> list[str]:
    """The first pick that differs (path, then score beyond the parity tolerance), or a different count."""
    recorded = certificate["picks"]
    table = selection.table
    if len(table) != len(recorded):
        return [f"recomputed {len(table)} picks, the certificate lists {len(recorded)}"]
    for pick, (_, row) in zip(recorded, table.iterrows(), strict=True):
        if row[PATH_COLUMN] != pick["path"]:
            return [f"rank {pick['rank']}: recomputed {row[PATH_COLUMN]!r}, the certificate lists {pick['path']!r}"]
        score = None if pd.isna(row["score"]) else float(row["score"])
        if (score is None) != (pick["score"] is None) or (
            score is not None and not math.isclose(score, pick["score"], rel_tol=SCORE_TOLERANCE, abs_tol=1e-6)
        ):
            return [f"rank {pick['rank']} ({pick['path']}): score {score} recomputed, {pick['score']} certified"]
    return []
