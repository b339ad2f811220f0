"""``xsel select CSV --bundle DIR``: selection at a hospital site with an exported bundle (no torch).

Images are decoded with the same code as ``xsel embed`` (``xsel.io.images``), encoded by the bundle's
``encoder.onnx``, reduced by the same pool rules as ``xsel select`` (exclusions, one image per patient),
and ranked by the bundle's learned selector or by any baseline selector plugin.
"""

from __future__ import annotations

import datetime as dt
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from xsel.bundle import MANIFEST, Bundle
from xsel.certificate import input_record
from xsel.constraints import Constraints
from xsel.errors import InputError
from xsel.identity import describe_identity
from xsel.io.outputs import claim_output
from xsel.io.table import PATH_COLUMN, read_image_table, write_errors_csv
from xsel.selection import Selection, select
from xsel.selectors import PoolFeatures
from xsel.store import Store, errors_path, read_store, write_store


class BundleSelector:
    """The bundle's learned selector as a selector object, run by onnxruntime: its input is prepared from the
    features the manifest names, so any exported selector plugin runs here without its code. It carries the bundle's
    trust gate, so the framework falls back exactly as on the workstation."""

    uses_labels = False

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.name = bundle.selector["name"]
        self.features = PoolFeatures.from_dict(bundle.selector.get("features", {}))
        self.encoder_identity = bundle.encoder_identity
        self.trust_gate = bundle.trust_gate

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.select_with_scores(embeddings, k, seed=seed, metadata=metadata)[0]

    def select_with_scores(self, embeddings, k, *, seed, metadata=None):
        """The ONNX top-k and every row's score from one run of the selector."""
        scores, top = self.bundle.scores(self.features.inputs(embeddings, metadata), k)
        return top.astype(np.int64), scores


def _count_errors(errors_csv: Path) -> int:
    return len(pd.read_csv(errors_csv)) if errors_csv.is_file() else 0


def bundle_store(
    bundle: Bundle,
    csv: str | Path,
    *,
    store: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    errors_csv: Path,
    show_progress: bool = True,
) -> tuple[Store, int]:
    """Embeddings of the CSV's images from the bundle's encoder, or from ``store`` when it already holds
    them (same encoder, same CSV); returns the store and how many images failed to decode."""
    identity = bundle.encoder_identity
    table = read_image_table(csv, image_root)
    csv_sha256 = table.source_sha256
    if store is not None and Path(store).exists():
        existing = read_store(store)
        if existing.encoder_identity != identity:
            raise InputError(
                f"{store} was made by {describe_identity(existing.encoder_identity)}, the bundle encodes with "
                f"{describe_identity(identity)}; pass another --store to encode again"
            )
        if existing.attrs.get("source_csv_sha256") != csv_sha256:
            raise InputError(f"{store} holds the embeddings of another CSV than {csv}; pass another --store")
        return existing, _count_errors(errors_csv)
    embeddings, kept, errors = bundle.embed_files(
        table.files, batch_size=batch_size, workers=workers, show_progress=show_progress
    )
    write_errors_csv(errors_csv, [table.paths[row] for row, _ in errors], [message for _, message in errors])
    if len(kept) == 0:
        raise InputError(f"{table.csv_path}: none of the {len(table.files)} images could be read; see {errors_csv}")
    meta = table.frame.drop(columns=[PATH_COLUMN]).iloc[kept].reset_index(drop=True)
    paths = [table.paths[row] for row in kept]
    attrs = {
        **identity,
        "encoder_options": {"bundle": str(bundle.path)},
        "xsel_version": bundle.manifest["xsel_version"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source_csv_sha256": csv_sha256,
    }
    if store is not None:
        write_store(store, embedding_chunks=[embeddings], paths=paths, meta=meta, attrs=attrs)
    return Store(path=Path(store or csv), embeddings=embeddings, paths=paths, meta=meta, attrs=attrs), len(errors)


def site_select(
    csv: str | Path,
    bundle: str | Path,
    k: int,
    *,
    out: str | Path,
    selector: str | None = None,
    device: str = "auto",
    store: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    seed: int = 0,
    exclude: str | Path | None = None,
    allow_same_patient: bool = False,
    constraints: Constraints | None = None,
    show_progress: bool = True,
    trust_gate: bool = True,
) -> Selection:
    """Select K images of ``csv`` (or of an image folder) with a bundle; the learned selector unless ``selector``
    names a baseline. ``constraints`` and ``trust_gate`` as in :func:`xsel.selection.select`."""
    if k < 1:
        raise InputError(f"--k {k}: choose at least 1 image")
    loaded = Bundle.load(bundle, device=device)
    learned = loaded.selector["name"] if loaded.selector is not None else None
    if selector is None and learned is None:
        raise InputError(f"{bundle} holds no learned selector; choose a baseline with --selector (e.g. typiclust)")
    errors_csv = errors_path(store) if store is not None else Path(str(out) + ".errors.csv")
    with ExitStack() as claimed:
        if store is not None:  # checked and locked before any image is encoded; an existing store is reused
            inputs = [csv if Path(csv).is_file() else None, bundle, exclude]  # a scanned folder may hold its store
            claimed.enter_context(claim_output(store, kind="store", option="--store", inputs=inputs, overwrite=True))
        pool, failed = bundle_store(
            loaded,
            csv,
            store=store,
            image_root=image_root,
            batch_size=batch_size,
            workers=workers,
            errors_csv=errors_csv,
            show_progress=show_progress,
        )
    if selector is not None and selector == learned:
        selector = None  # the bundle's own learned selector, by name
    chosen = BundleSelector(loaded) if selector is None else selector
    result = select(
        pool,
        k,
        selector=chosen,
        seed=seed,
        exclude=exclude,
        allow_same_patient=allow_same_patient,
        constraints=constraints,
        trust_gate=trust_gate,
    )
    result.record["mode"] = "site"
    images = input_record(csv)
    if images["sha256"] is None:  # a folder of images: what identifies it is its scanned listing
        images["listing_sha256"] = pool.attrs.get("source_csv_sha256")
    result.record["selector_source"] = (
        {key: loaded.selector.get(key) for key in ("plugin", "distribution", "version")} | {"bundle": str(bundle)}
        if isinstance(chosen, BundleSelector)
        else None
    )
    result.record["inputs"] |= {
        "images": images,
        "bundle": input_record(Path(bundle) / MANIFEST),
        "site_store": input_record(store) if store is not None else None,
    }
    result.record["selector_options"] = {
        "selector": selector,
        "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
        "trust_gate": trust_gate,
    }
    if failed:
        result.warnings.append(f"{failed} images could not be read; they are listed in {errors_csv}")
    return result
