"""The embedding store: one HDF5 file holding embeddings, image paths, carried CSV columns and provenance.

Layout (schema_version 1):
  /embeddings  float32 (N, D), chunked and resizable
  /paths       UTF-8 strings (N,): the input CSV's ``Path`` values verbatim
  /meta/<col>  one dataset per carried column: numbers float64 (NaN = blank), text UTF-8 ("" = blank)
  attributes   schema_version, xsel_version, created, encoder, encoder_options (JSON), weights_sha256,
               preprocessing (JSON), source_csv_sha256
A reader needs only /embeddings, /paths and schema_version; /meta is optional.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
import pandas as pd

from xsel.errors import InputError

SCHEMA_VERSION = 1
JSON_ATTRIBUTES = ("encoder_options", "preprocessing")
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
        return {key: self.attrs.get(key) for key in ("encoder", "weights_sha256", "preprocessing")}

    def __len__(self) -> int:
        return len(self.paths)


def errors_path(store_path: str | Path) -> Path:
    """Where the images that failed to decode are listed: next to the store, ``<name>.errors.csv``."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".errors.csv")


def _meta_dataset(values: pd.Series) -> tuple[np.ndarray, object]:
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan), np.float64
    text = values.astype(object).where(values.notna(), "").astype(str)
    return text.to_numpy(dtype=object), h5py.string_dtype("utf-8")


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
    streaming them keeps memory flat however large the store.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as handle:
            written = 0
            dataset = None
            for chunk in embedding_chunks:
                chunk = np.asarray(chunk, dtype=np.float32)
                if dataset is None:
                    dataset = handle.create_dataset(
                        "embeddings",
                        shape=(0, chunk.shape[1]),
                        maxshape=(None, chunk.shape[1]),
                        dtype=np.float32,
                        chunks=(min(ROW_CHUNK, max(1, len(paths))), chunk.shape[1]),
                    )
                dataset.resize(written + len(chunk), axis=0)
                dataset[written : written + len(chunk)] = chunk
                written += len(chunk)
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


def read_store(path: str | Path) -> Store:
    """Open a store, checking what every reader needs; a bad file raises a one-line :class:`InputError`."""
    path = Path(path)
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
        embeddings = handle["embeddings"][...]
        paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in handle["paths"][...]]
        if embeddings.ndim != 2 or len(embeddings) != len(paths):
            raise InputError(f"{path}: /embeddings {embeddings.shape} does not match {len(paths)} paths")
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
    meta = pd.DataFrame(columns, index=pd.RangeIndex(len(paths)))
    return Store(path=path, embeddings=embeddings.astype(np.float32, copy=False), paths=paths, meta=meta, attrs=attrs)
