"""The embedding store: one HDF5 file holding embeddings, image paths, carried CSV columns and provenance.

Layout (schema_version 1):
  /embeddings  float32 (N, D), chunked and resizable
  /paths       UTF-8 strings (N,): the input CSV's ``Path`` values verbatim
  /meta/<col>  one dataset per carried column: numbers float64 (NaN = blank), text UTF-8 ("" = blank)
  attributes   schema_version, xsel_version, created, encoder, encoder_options (JSON), weights_sha256,
               preprocessing (JSON), source_csv_sha256; a merged store has merged_from (JSON: each input's path,
               sha256, rows, created and source_csv_sha256) instead of source_csv_sha256
A reader needs only /embeddings, /paths and schema_version; /meta is optional.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
import pandas as pd

from xsel.errors import InputError
from xsel.identity import describe_identity, identity_of
from xsel.io.outputs import claim_output, writing

SCHEMA_VERSION = 1
JSON_ATTRIBUTES = ("encoder_options", "preprocessing", "merged_from")
ROW_CHUNK = 4096


@dataclass
class Store:
    """An embedding store read into memory. ``meta`` has one row per embedding, in store order."""

    path: Path
    embeddings: np.ndarray
    paths: list[str]
    meta: pd.DataFrame
    attrs: dict = field(default_factory=dict)

    @property
    def encoder_identity(self) -> dict:
        """Encoder name, weights_sha256 and preprocessing: what selector checkpoints and bundles must match."""
        return identity_of(self.attrs)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> Store:
        """The store's ``rows`` (indices, or a boolean mask over the rows), in memory, with its path and attributes:
        what training and evaluation read of one hospital or one split."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        meta = self.meta.iloc[rows].reset_index(drop=True)
        return Store(self.path, self.embeddings[rows], [self.paths[i] for i in rows], meta, self.attrs)


def check_finite(store: Store) -> None:
    """Refuse embeddings with NaN or infinite values, naming the first rows."""
    bad = np.concatenate(  # block by block: no N × D boolean copy of a large store
        [
            start + np.flatnonzero(~np.isfinite(store.embeddings[start : start + ROW_CHUNK]).all(axis=1))
            for start in range(0, len(store.embeddings), ROW_CHUNK)
        ]
        or [np.zeros(0, dtype=np.int64)]
    )
    if len(bad):
        named = ", ".join(f"row {i} ({store.paths[i]})" for i in bad[:3])
        raise InputError(f"{store.path}: {len(bad)} embeddings hold NaN or infinite values: {named}; re-embed them")


def check_distinct_paths(store: Store) -> None:
    """Refuse a store listing an image twice (a hand-made or concatenated file): exclusions, the one-per-patient
    rule and the selection CSV all key on ``Path``."""
    seen: dict[str, int] = {}
    for row, path in enumerate(store.paths):
        if path in seen:
            raise InputError(
                f"{store.path}: rows {seen[path]} and {row} hold the same path {path!r}; every image may appear once "
                "(`xsel embed` and `xsel store merge` write such stores)"
            )
        seen[path] = row


def errors_path(store_path: str | Path) -> Path:
    """Where the images that failed to decode are listed: next to the store, ``<name>.errors.csv``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".errors.csv")


def _meta_dataset(values: pd.Series) -> tuple[np.ndarray, object]:
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan), np.float64
    text = values.astype(object).where(values.notna(), "").astype(str)
    return text.to_numpy(dtype=object), h5py.string_dtype("utf-8")


def _row_blocks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The rows of ``chunks`` regrouped into blocks of ``ROW_CHUNK`` (the last one shorter): whole HDF5 chunks."""
    pending, held = [], 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32)
        while len(chunk):
            take = chunk[: ROW_CHUNK - held]
            pending.append(take)
            held += len(take)
            chunk = chunk[len(take) :]
            if held == ROW_CHUNK:
                yield np.concatenate(pending)
                pending, held = [], 0
    if pending:
        yield np.concatenate(pending)


def write_store(
    path: str | Path,
    *,
    embedding_chunks: Iterable[np.ndarray],
    paths: list[str],
    meta: pd.DataFrame,
    attrs: dict,
) -> None:
    """Write a complete store atomically: a temporary file in the same folder, renamed when done.

    ``embedding_chunks`` yields float32 ``(n_i, D)`` blocks whose rows add up to ``len(paths)``;
    streaming them keeps memory flat however large the store. Rows are written a whole HDF5 chunk at a time
    with HDF5's chunk cache off, so a full disk fails the write that hit it (a one-line :class:`InputError`,
    the temporary removed) instead of failing later inside HDF5's cache flush, which crashed the interpreter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    blocks = _row_blocks(embedding_chunks)
    first = next(blocks, None)
    dim = 0 if first is None else first.shape[1]
    needed = len(paths) * dim * 4 + sum(len(str(p).encode()) for p in paths)  # embeddings and paths, roughly
    try:
        with writing(path, needed=needed), h5py.File(temporary, "w", rdcc_nbytes=0) as handle:
            written = 0
            dataset = None
            for block in itertools.chain([] if first is None else [first], blocks):
                if dataset is None:
                    dataset = handle.create_dataset(
                        "embeddings",
                        shape=(0, block.shape[1]),
                        maxshape=(None, block.shape[1]),
                        dtype=np.float32,
                        chunks=(min(ROW_CHUNK, max(1, len(paths))), block.shape[1]),
                    )
                dataset.resize(written + len(block), axis=0)
                dataset[written : written + len(block)] = block
                written += len(block)
            if written != len(paths):
                raise ValueError(f"store writer got {written} embeddings for {len(paths)} paths")
            handle.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype("utf-8"))
            group = handle.create_group("meta")
            group.attrs["columns"] = json.dumps([str(c) for c in meta.columns])
            for column in meta.columns:
                data, dtype = _meta_dataset(meta[column])
                item = group.create_dataset(quote(str(column), safe=""), data=data, dtype=dtype)
                item.attrs["column"] = str(column)
            for key, value in attrs.items():
                handle.attrs[key] = json.dumps(value, sort_keys=True) if key in JSON_ATTRIBUTES else value
            handle.attrs["schema_version"] = SCHEMA_VERSION
        with writing(path):
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _decode_attr(key: str, value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if key in JSON_ATTRIBUTES and isinstance(value, str):
        return json.loads(value)
    return value


@contextmanager
def _open_checked(path: Path) -> Iterator[h5py.File]:
    """Open a store for reading after checking what every reader needs (one-line :class:`InputError`)."""
    if not path.is_file():
        raise InputError(f"{path}: embedding store not found; create one with `xsel embed CSV --out {path}`")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not a readable HDF5 embedding store") from None
    with handle:
        version = _decode_attr("schema_version", handle.attrs.get("schema_version"))
        if not isinstance(version, int) or version != SCHEMA_VERSION:
            raise InputError(
                f"{path}: schema_version {version!r} is not {SCHEMA_VERSION}; "
                "re-create it with this xsel's `xsel embed`"
            )
        for name in ("embeddings", "paths"):
            if name not in handle:
                raise InputError(f"{path}: missing the /{name} dataset; re-create the store with `xsel embed`")
        shape, rows = handle["embeddings"].shape, len(handle["paths"])
        if len(shape) != 2 or shape[0] != rows:
            raise InputError(f"{path}: /embeddings {shape} does not match {rows} paths")
        yield handle


def _read_rows(handle: h5py.File) -> tuple[list[str], pd.DataFrame, dict]:
    """Paths, meta columns and attributes: everything in a store but its embeddings."""
    paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in handle["paths"][...]]
    columns = {}
    if "meta" in handle:
        group = handle["meta"]
        order = json.loads(group.attrs.get("columns", "[]")) or [group[k].attrs.get("column", k) for k in group]
        by_column = {group[key].attrs.get("column", key): group[key] for key in group}
        for column in order:
            data = by_column[column][...]
            if data.dtype.kind in "OS":
                text = pd.Series([v.decode("utf-8") if isinstance(v, bytes) else v for v in data], dtype=object)
                columns[column] = text.replace("", np.nan)
            else:
                columns[column] = pd.Series(data)
    attrs = {key: _decode_attr(key, value) for key, value in handle.attrs.items()}
    return paths, pd.DataFrame(columns, index=pd.RangeIndex(len(paths))), attrs


def read_store(path: str | Path) -> Store:
    """Open a store, checking what every reader needs; a bad file raises a one-line :class:`InputError`."""
    path = Path(path)
    with _open_checked(path) as handle:
        dataset = handle["embeddings"]
        embeddings = np.empty(dataset.shape, dtype=np.float32)
        if embeddings.size:  # straight into float32 (HDF5 converts): 2–3× faster than dataset[...] at 10⁶ rows
            dataset.read_direct(embeddings)
        paths, meta, attrs = _read_rows(handle)
    return Store(path=path, embeddings=embeddings, paths=paths, meta=meta, attrs=attrs)


@dataclass
class MergeResult:
    """What ``merge_stores`` wrote: the store, its row count, the errors file (if any) and warnings."""

    store: Path
    rows: int
    inputs: list[Path]
    errors_csv: Path | None
    warnings: list[str] = field(default_factory=list)


def _merge_embeddings(inputs: list[Path]) -> Iterator[np.ndarray]:
    """Each input's embeddings in blocks of ``ROW_CHUNK`` rows, so merging never holds a whole store."""
    for path in inputs:
        with _open_checked(path) as handle:
            dataset = handle["embeddings"]
            for start in range(0, dataset.shape[0], ROW_CHUNK):
                yield dataset[start : start + ROW_CHUNK]


def merge_stores(inputs: list[str | Path], out: str | Path, *, overwrite: bool = False) -> MergeResult:
    """Merge stores of one encoder identity into ``out``, so a site can embed an archive in parts and select once.

    Rows keep input order; meta columns are the union (blank where a store lacks one); a path in two inputs,
    or stores of different encoder identities, are refused naming both. Each input's errors file joins
    ``<out>.errors.csv``; ``merged_from`` records every input's SHA-256.
    """
    inputs, out = [Path(p) for p in inputs], Path(out)
    if len(inputs) < 2:
        raise InputError(f"store merge needs at least two stores, got {len(inputs)}: {', '.join(map(str, inputs))}")
    resolved = {}
    for path in inputs:
        if path.resolve() in resolved:
            raise InputError(f"{path} is listed twice (also as {resolved[path.resolve()]}); list each store once")
        resolved[path.resolve()] = path
    with claim_output(out, kind="store", inputs=inputs, overwrite=overwrite):
        return _merge_claimed(inputs, out)


def _merge_claimed(inputs: list[Path], out: Path) -> MergeResult:
    """:func:`merge_stores` once ``out`` is checked and locked."""
    from xsel import __version__
    from xsel.io.table import PATH_COLUMN, file_sha256, write_errors_csv

    headers = []
    for path in inputs:
        with _open_checked(path) as handle:
            paths, meta, attrs = _read_rows(handle)
            headers.append((path, paths, meta, attrs, handle["embeddings"].shape[1]))
    first_path, _, _, first_attrs, first_dim = headers[0]
    identity = identity_of(first_attrs)
    warnings = []
    seen: dict[str, Path] = {}
    for path, paths, _, attrs, dim in headers:
        if identity_of(attrs) != identity or dim != first_dim:
            raise InputError(
                f"{first_path} was made by {describe_identity(identity)} ({first_dim}-d) but {path} by "
                f"{describe_identity(identity_of(attrs))} ({dim}-d); merge only stores of the same encoder, "
                "weights and preprocessing"
            )
        if attrs.get("encoder_options") != first_attrs.get("encoder_options"):
            warnings.append(
                f"{path} was embedded with options {attrs.get('encoder_options')}, {first_path} with "
                f"{first_attrs.get('encoder_options')}; the merged store records the first"
            )
        for value in paths:
            if value in seen:
                where = f"twice in {path}" if seen[value] == path else f"in both {seen[value]} and {path}"
                raise InputError(f"path {value!r} is {where}; each image may be in one store only")
            seen[value] = path
    merged_from = [
        {
            "path": str(path),
            "sha256": file_sha256(path),
            "rows": len(paths),
            "created": attrs.get("created"),
            "source_csv_sha256": attrs.get("source_csv_sha256"),
        }
        for path, paths, _, attrs, _ in headers
    ]
    attrs = {key: value for key, value in identity.items() if value is not None}
    if first_attrs.get("encoder_options") is not None:
        attrs["encoder_options"] = first_attrs["encoder_options"]
    attrs.update(
        xsel_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        merged_from=merged_from,
    )
    write_store(
        out,
        embedding_chunks=_merge_embeddings(inputs),
        paths=[value for _, paths, _, _, _ in headers for value in paths],
        meta=pd.concat([meta for _, _, meta, _, _ in headers], ignore_index=True, sort=False),
        attrs=attrs,
    )
    failed = [pd.read_csv(errors_path(p), dtype=str, keep_default_na=False) for p in inputs if errors_path(p).is_file()]
    failed = pd.concat(failed, ignore_index=True) if failed else pd.DataFrame({PATH_COLUMN: [], "error": []})
    errors_csv = write_errors_csv(errors_path(out), failed[PATH_COLUMN].tolist(), failed["error"].tolist())
    return MergeResult(store=out, rows=len(seen), inputs=inputs, errors_csv=errors_csv, warnings=warnings)
