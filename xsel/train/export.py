"""``xsel export``: an encoder (and optionally a learned selector) → an ONNX bundle a site runs without torch.

Any learned selector plugin exports: its ``scorer()`` (``(1, N, D′)`` → ``(1, N)`` scores) becomes
``selector.onnx`` with the top-k inside the graph, and the manifest names the plugin, the input features it reads
(``pool_features``) and how the site prepares them, so a site runs it with no code of the plugin's.

The legacy TorchScript-based exporter (``dynamo=False``) is used on purpose: it keeps the batch, pool
length and K symbolic for the bidirectional LSTM, where the dynamo exporter freezes the pool length.
Every model is checked with ``onnx.checker`` and against PyTorch on seeded inputs — encoder at several
batch sizes, selector at pool sizes other than the export example, one smaller than K — and a failed
check writes no bundle. The bundle appears in one rename when complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from xsel import __version__, plugins
from xsel.bundle import BUNDLE_SCHEMA, ENCODER_FILE, MANIFEST, SELECTOR_FILE, make_session
from xsel.encoders import create_encoder, model_identity
from xsel.errors import InputError, XselError
from xsel.identity import describe_identity
from xsel.io.outputs import claim_output, writing
from xsel.io.table import file_sha256
from xsel.selectors import PoolFeatures, create_selector, factory_options, parse_selector_spec

OPSET = 17
ENCODER_BATCHES = (1, 3)
SELECTOR_POOLS = (7, 61, 250)  # the export example has 50; 7 is smaller than the default K
SELECTOR_K = 20
RTOL, ATOL = 1e-3, 1e-4


class ExportedSelector(torch.nn.Module):
    """Scores plus the top-k indices, k clamped to the pool length inside the graph (ONNX TopK needs k ≤ N)."""

    def __init__(self, scorer: torch.nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, pool, k):
        scores = self.scorer(pool)
        k_in_pool = torch.minimum(k, torch._shape_as_tensor(pool)[1])
        return scores, torch.topk(scores, k_in_pool, dim=1).indices


def _onnx_export(module, example, path: Path, **options) -> None:
    """torch.onnx.export with the legacy exporter, chosen on purpose: silence its notices (the parity
    checks that follow are what proves the graph right)."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*LSTM can cause an error.*")
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # shape checks inside nn.LSTM
        torch.onnx.export(module, example, str(path), dynamo=False, **options)


def _check(name: str, reference: np.ndarray, exported: np.ndarray) -> dict:
    difference = float(np.abs(reference - exported).max()) if reference.size else 0.0
    if reference.shape != exported.shape or not np.allclose(exported, reference, rtol=RTOL, atol=ATOL):
        raise XselError(
            f"parity check failed for {name}: shapes {reference.shape} vs {exported.shape}, max abs difference "
            f"{difference:.2e} (tolerance rtol {RTOL}, atol {ATOL}); no bundle was written"
        )
    return {"case": name, "max_abs_diff": difference}


def _add_metadata(path: Path, metadata: dict) -> None:
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_bundle(
    out: str | Path,
    *,
    encoder: str = "resnet18",
    weights: str | None = None,
    image_size: int | None = None,
    selector: str | Path | object | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
) -> dict:
    """Write the bundle folder ``out``; returns its manifest.

    ``selector``: a learned selector to include — ``NAME=CHECKPOINT`` (any plugin whose selector offers
    ``scorer()``), a bare ``RUN/selector.pt`` (MedSelect), or a ready selector object with a ``name``.
    """
    out = Path(out)
    with claim_output(out, kind="bundle", inputs=_export_inputs(weights, selector), overwrite=overwrite):
        return _export_claimed(out, encoder, weights, image_size, selector, opset)


def _export_inputs(weights, selector) -> list[Path]:
    """The files an export reads (weights, a selector checkpoint): the bundle may not replace or hold them."""
    named = [weights]
    if isinstance(selector, (str, Path)):
        named.append(str(selector).partition("=")[2] or str(selector))
    elif selector is not None:
        named.append(getattr(selector, "checkpoint", None))
    return [Path(item) for item in named if item and Path(item).exists()]


def _export_claimed(out: Path, encoder, weights, image_size, selector, opset: int) -> dict:
    model = create_encoder(encoder, weights, image_size=image_size).cpu().eval()
    identity = model_identity(encoder, model)
    name, learned = _learned_selector(selector) if selector is not None else (None, None)
    if learned is not None and learned.encoder_identity != identity:
        raise InputError(
            f"selector {name!r} was trained on embeddings of {describe_identity(learned.encoder_identity)}, not "
            f"of {describe_identity(identity)}; export the encoder (weights, --image-size) it was trained with"
        )
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with writing(out):  # a full disk: one line, and the staging folder goes
            staging.mkdir()
            manifest = _write_models(staging, model, identity, name, learned, opset)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if out.exists():
                retired = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, retired)
                os.replace(staging, out)
                shutil.rmtree(retired)
            else:
                os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _learned_selector(selector) -> tuple[str, object]:
    """(registered name, selector object) of an exportable learned selector; anything else is an input error."""
    refusal = (
        "cannot be exported: a bundle holds learned selectors (a plugin whose selector offers scorer() and "
        "encoder_identity); baselines run at the site by name with --selector"
    )
    if isinstance(selector, (str, Path)):
        spec = str(selector)  # an existing path is MedSelect's checkpoint even when it holds "=" (runs/lr=0.1/…)
        _, name, options = parse_selector_spec(spec if "=" in spec and not Path(spec).exists() else f"medselect={spec}")
        if "checkpoint" not in options or "checkpoint" not in factory_options(plugins.get("selector", name).factory):
            raise InputError(f"selector {name!r} {refusal}")
        instance = create_selector(name, **options)
    else:
        name, instance = selector.name, selector
    if not callable(getattr(instance, "scorer", None)) or getattr(instance, "encoder_identity", None) is None:
        raise InputError(f"selector {name!r} {refusal}")
    return name, instance


def export_encoder(model, path: Path, opset: int = OPSET, device: str = "cpu") -> list[dict]:
    """Write ``model`` as ONNX (dynamic batch, input ``images``, output ``embeddings``), check it, and
    compare it with PyTorch at each of ``ENCODER_BATCHES``; returns the parity results."""
    pre = model.preprocessing
    size, channels = int(pre["image_size"]), int(pre["channels"])
    generator = torch.Generator().manual_seed(0)
    model = model.cpu().eval()
    _onnx_export(
        model,
        (torch.randn(2, channels, size, size, generator=generator),),
        path,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        opset_version=opset,
    )
    onnx.checker.check_model(str(path))
    session = make_session(path, device)
    checks = []
    for batch in ENCODER_BATCHES:
        images = torch.randn(batch, channels, size, size, generator=generator)
        with torch.inference_mode():
            reference = model(images).numpy()
        checks.append(
            _check(f"encoder batch {batch}", reference, session.run(["embeddings"], {"images": images.numpy()})[0])
        )
    return checks


def _write_models(folder: Path, model, identity: dict, name: str | None, learned, opset: int) -> dict:
    parity = {
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "encoder": export_encoder(model, folder / ENCODER_FILE, opset),
        "selector": [],
    }
    encoder_entry = {
        "name": identity["encoder"],
        "weights_sha256": identity["weights_sha256"],
        "preprocessing": identity["preprocessing"],
        "embedding_dim": int(model.embedding_dim),
        "input": "images",
        "output": "embeddings",
        "file": ENCODER_FILE,
    }
    manifest = {
        "schema_version": BUNDLE_SCHEMA,
        "xsel_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "opset": opset,
        "encoder": encoder_entry,
        "selector": None,
    }
    if learned is not None:
        manifest["selector"] = _write_selector(folder, name, learned, int(model.embedding_dim), opset, parity)
    parity["passed"] = True
    manifest["parity"] = parity
    for file in (ENCODER_FILE, SELECTOR_FILE):
        if (folder / file).exists():
            _add_metadata(folder / file, {"xsel_encoder": encoder_entry, "xsel_version": __version__})
    manifest["sha256"] = {
        file: file_sha256(folder / file) for file in (ENCODER_FILE, SELECTOR_FILE) if (folder / file).exists()
    }
    return manifest


def _write_selector(folder: Path, name: str, learned, embedding_dim: int, opset: int, parity: dict) -> dict:
    """``selector.onnx`` from the selector's scorer, checked at pool sizes other than the export example; returns
    the manifest entry that lets a site prepare its input and run it."""
    features = getattr(learned, "pool_features", None) or PoolFeatures()
    width = features.width(embedding_dim)
    scorer = learned.scorer().cpu().eval()
    generator = torch.Generator().manual_seed(0)
    path = folder / SELECTOR_FILE
    _onnx_export(
        ExportedSelector(scorer).eval(),
        (torch.randn(1, 50, width, generator=generator), torch.tensor(5, dtype=torch.int64)),
        path,
        input_names=["pool", "k"],
        output_names=["scores", "top_indices"],
        dynamic_axes={
            "pool": {0: "batch", 1: "pool_size"},
            "scores": {0: "batch", 1: "pool_size"},
            "top_indices": {0: "batch", 1: "k_in_pool"},
        },
        opset_version=opset,
    )
    onnx.checker.check_model(str(path))
    session = make_session(path, "cpu")
    for pool_size in SELECTOR_POOLS:
        pool = torch.randn(1, pool_size, width, generator=generator)
        with torch.inference_mode():
            reference = scorer(pool).numpy()
        scores, top = session.run(
            ["scores", "top_indices"], {"pool": pool.numpy(), "k": np.array(SELECTOR_K, np.int64)}
        )
        check = _check(f"selector pool {pool_size}", reference, scores)
        expected = np.argsort(-reference[0], kind="stable")[: min(SELECTOR_K, pool_size)]
        # the same picks, in the same order (a swap is only tolerated between tied scores)
        if not np.allclose(reference[0][top[0]], reference[0][expected], rtol=0, atol=ATOL):
            raise XselError(f"parity check failed for selector top-k at pool {pool_size}; no bundle was written")
        check["same_top_k"] = bool(np.array_equal(top[0], expected))
        parity["selector"].append(check)
    registration = plugins.get("selector", name)
    details = learned.export_details() if callable(getattr(learned, "export_details", None)) else {}
    return {
        "name": registration.name,
        "plugin": registration.plugin,
        "distribution": registration.distribution,
        "version": registration.version,
        "file": SELECTOR_FILE,
        "inputs": {"pool": "pool", "k": "k"},
        "outputs": {"scores": "scores", "top_indices": "top_indices"},
        "input_dim": int(width),
        "embedding_dim": int(embedding_dim),
        "features": features.to_dict(),
        "checkpoint": _checkpoint_record(getattr(learned, "checkpoint", None)),
        "details": details,
    }


def _checkpoint_record(checkpoint) -> dict | None:
    """The selector's checkpoint by file name and SHA-256: the training machine's folders stay out of the bundle."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    return {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint)}
