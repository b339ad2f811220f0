"""``xsel export``: an encoder (and optionally a learned selector) → an ONNX bundle a site runs without torch.

Any learned selector plugin exports: its ``scorer()`` (``(1, N, D′)`` → ``(1, N)`` scores) becomes
``selector.onnx`` with the top-k inside the graph, and the manifest names the plugin, the input features it reads
(``pool_features``) and how the site prepares them, so a site runs it with no code of the plugin's.

The legacy TorchScript-based exporter (``dynamo=False``) is used on purpose: it keeps the batch, pool
length and K symbolic for the bidirectional LSTM, where the dynamo exporter freezes the pool length.
Every model is checked with ``onnx.checker`` and against PyTorch on seeded inputs — encoder at several
batch sizes, selector at pool sizes other than the export example, one smaller than K — and a failed
check writes no bundle. The bundle appears in one rename when complete.

``quantize="int8"`` replaces ``encoder.onnx`` by an onnxruntime static-quantized (QDQ) model calibrated on a
seeded sample of the researcher's images, kept only if the site selection on that sample agrees with the fp32
encoder's (see :func:`quantize_encoder`); the selector stays fp32.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from xsel import __version__, plugins
from xsel.bundle import BUNDLE_SCHEMA, ENCODER_FILE, MANIFEST, SELECTOR_FILE, TRUST_FILE, make_session
from xsel.encoders import create_encoder, model_identity
from xsel.errors import InputError, XselError
from xsel.identity import describe_identity
from xsel.io.atomic import replace_folder
from xsel.io.images import decode_or_error
from xsel.io.outputs import claim_output, writing
from xsel.io.table import file_sha256, read_image_table
from xsel.selectors import PoolFeatures, create_selector, factory_options, parse_selector_spec
from xsel.train.medselect import learned_plugin

OPSET = 17
ENCODER_BATCHES = (1, 3)
SELECTOR_POOLS = (7, 61, 250)  # the export example has 50; 7 is smaller than the default K
SELECTOR_K = 20
RTOL, ATOL = 1e-3, 1e-4
# a sequential selector's picks must be PyTorch's exactly; its scores (report and certificate only) may differ more:
# in a pool smaller than its anchors, z-scored features that are constant up to rounding carry float noise
SEQUENTIAL_RTOL, SEQUENTIAL_ATOL = 1e-2, 2e-3
QUANTIZATIONS = ("int8",)
AGREEMENT_K = 20  # the site selection compared between the fp32 and the int8 encoder
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 16


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
    """torch.onnx.export with the legacy exporter, chosen on purpose: silence every notice it prints (its own
    deprecation, shape checks inside nn.LSTM, constant folding on a plugin's Slice ops…) — the parity checks that
    follow are what proves the graph right."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, **options)


def _check(name: str, reference: np.ndarray, exported: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> dict:
    difference = float(np.abs(reference - exported).max()) if reference.size else 0.0
    if reference.shape != exported.shape or not np.allclose(exported, reference, rtol=rtol, atol=atol):
        raise XselError(
            f"parity check failed for {name}: shapes {reference.shape} vs {exported.shape}, max abs difference "
            f"{difference:.2e} (tolerance rtol {rtol}, atol {atol}); no bundle was written"
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
    quantize: str | None = None,
    calibration: str | Path | None = None,
    calibration_images: int = 200,
    min_agreement: float = 0.95,
) -> dict:
    """Write the bundle folder ``out``; returns its manifest.

    ``selector``: a learned selector to include — ``NAME=CHECKPOINT`` (any plugin whose selector offers
    ``scorer()``), a bare ``RUN/selector.pt`` (MedSelect), or a ready selector object with a ``name``.
    ``quantize="int8"``: an int8 encoder calibrated on ``calibration_images`` images drawn (seeded) from
    ``calibration`` (a CSV or an image folder), written only if at least ``min_agreement`` of the K=20 site picks
    on them are those of the fp32 encoder.
    """
    out = Path(out)
    int8 = _int8_options(quantize, calibration, calibration_images, min_agreement)
    inputs = [*_export_inputs(weights, selector), *([Path(calibration)] if int8 else [])]

    with claim_output(out, kind="bundle", inputs=inputs, overwrite=overwrite):
        return _export_claimed(out, encoder, weights, image_size, selector, opset, int8)


def _int8_options(quantize, calibration, calibration_images: int, min_agreement: float) -> dict | None:
    """The quantization request checked before anything is exported; ``None`` for an fp32 bundle."""
    if quantize is None:
        if calibration is not None:
            raise InputError("--calibration applies to --quantize int8; add it, or leave --calibration out for fp32")
        return None
    if quantize not in QUANTIZATIONS:
        raise InputError(f"--quantize {quantize}: choose {', '.join(QUANTIZATIONS)} (or leave it out for fp32)")
    if calibration is None:
        raise InputError("--quantize int8 needs --calibration CSV_OR_FOLDER: images like those the sites will select")
    if not Path(calibration).exists():
        raise InputError(f"--calibration {calibration}: file or folder not found")
    if calibration_images < 2 * AGREEMENT_K:
        raise InputError(
            f"--calibration-images {calibration_images}: the agreement check picks K={AGREEMENT_K}; use at least "
            f"{2 * AGREEMENT_K}"
        )
    if not 0 <= min_agreement <= 1:
        raise InputError(f"--min-agreement {min_agreement}: choose a fraction in [0, 1] (0 records it only)")
    # read now: a bad list is the calibration's one-line error before any export work, not after it
    table = read_image_table(calibration, show_progress=False)
    return {"calibration": table, "images": calibration_images, "min_agreement": min_agreement}


def _export_inputs(weights, selector) -> list[Path]:
    """The files an export reads (weights, a selector checkpoint): the bundle may not replace or hold them."""
    named = [weights]
    if isinstance(selector, (str, Path)):
        named.append(_selector_spec(selector)[1])
    elif selector is not None:
        named.append(getattr(selector, "checkpoint", None))
    return [Path(item) for item in named if item and Path(item).exists()]


def _export_claimed(out: Path, encoder, weights, image_size, selector, opset: int, int8: dict | None) -> dict:
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
            manifest = _write_models(staging, model, identity, name, learned, opset, int8)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _selector_spec(selector: str | Path) -> tuple[str | None, str]:
    """(plugin name, checkpoint) of ``--selector``: ``NAME=CHECKPOINT``, or a bare checkpoint of ``xsel train selector``
    (name None: the checkpoint says which) — an existing path is a checkpoint even when it holds "=" (runs/lr=0.1/…)."""
    spec = str(selector)
    if "=" in spec and not Path(spec).exists():
        name, _, checkpoint = spec.partition("=")
        return name, checkpoint
    return None, spec


def _learned_selector(selector) -> tuple[str, object]:
    """(registered name, selector object) of an exportable learned selector; anything else is an input error."""
    refusal = (
        "cannot be exported: a bundle holds learned selectors (a plugin whose selector offers scorer() or "
        "policy(), and encoder_identity); baselines run at the site by name with --selector"
    )
    if isinstance(selector, (str, Path)):
        name, checkpoint = _selector_spec(selector)
        _, name, options = parse_selector_spec(f"{name or learned_plugin(checkpoint)}={checkpoint}")
        if "checkpoint" not in options or "checkpoint" not in factory_options(plugins.get("selector", name).factory):
            raise InputError(f"selector {name!r} {refusal}")
        instance = create_selector(name, **options)
    else:
        name, instance = selector.name, selector
    graph = getattr(instance, "scorer", None) or getattr(instance, "policy", None)
    if not callable(graph) or getattr(instance, "encoder_identity", None) is None:
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


def _write_models(folder: Path, model, identity: dict, name: str | None, learned, opset: int, int8) -> dict:
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
    if int8 is not None:
        manifest["quantization"] = quantize_encoder(folder, encoder_entry, manifest["selector"], **int8)
    for file in (ENCODER_FILE, SELECTOR_FILE):
        if (folder / file).exists():
            _add_metadata(folder / file, {"xsel_encoder": encoder_entry, "xsel_version": __version__})
    manifest["sha256"] = {
        file: file_sha256(folder / file)
        for file in (ENCODER_FILE, SELECTOR_FILE, TRUST_FILE)
        if (folder / file).exists()
    }
    return manifest


def _write_selector(folder: Path, name: str, learned, embedding_dim: int, opset: int, parity: dict) -> dict:
    """``selector.onnx`` from the selector's scorer, checked at pool sizes other than the export example; returns
    the manifest entry that lets a site prepare its input and run it."""
    features = getattr(learned, "pool_features", None) or PoolFeatures()
    width = features.width(embedding_dim)
    parity["selector"] = _export_selector_graph(learned, width, folder / SELECTOR_FILE, opset)
    registration = plugins.get("selector", name)
    details = learned.export_details() if callable(getattr(learned, "export_details", None)) else {}
    gate = getattr(learned, "trust_gate", None)
    if gate is not None:  # its reference rows as a plain .npy (read without pickle at the site), hashed with the rest
        if gate.dim != embedding_dim:
            raise InputError(
                f"selector {name!r}: its trust gate compares {gate.dim}-d rows, the encoder gives {embedding_dim}"
            )
        np.save(folder / TRUST_FILE, np.asarray(gate.reference, dtype=np.float32), allow_pickle=False)
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
        **({"trust_gate": gate.to_record()} if gate is not None else {}),
    }


def _export_selector_graph(learned, width: int, path: Path, opset: int) -> list[dict]:
    """Write the selector's graph — ``(pool, k) → (scores, top_indices)`` — and check it against PyTorch.

    A scoring selector (``scorer()``) gets the top-k added inside the graph. A sequential one (``policy()``: a
    TorchScript-compatible module returning scores and its K picks) is scripted, so its loop over the K steps is
    in the graph; its picks must be PyTorch's exactly."""
    sequential = callable(getattr(learned, "policy", None))
    module = learned.policy() if sequential else learned.scorer()
    module = module.cpu().eval()
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice: it is the exporter's input here
        graph = torch.jit.script(module) if sequential else ExportedSelector(module).eval()
    _onnx_export(
        graph,
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
    checks = []
    for pool_size in SELECTOR_POOLS:
        pool = torch.randn(1, pool_size, width, generator=generator)
        with torch.no_grad():
            if sequential:
                reference, expected = (t.numpy() for t in module(pool, torch.tensor(SELECTOR_K)))
                expected = expected[0]
            else:
                reference = module(pool).numpy()
                expected = np.argsort(-reference[0], kind="stable")[: min(SELECTOR_K, pool_size)]
        scores, top = session.run(
            ["scores", "top_indices"], {"pool": pool.numpy(), "k": np.array(SELECTOR_K, np.int64)}
        )
        tolerance = (SEQUENTIAL_RTOL, SEQUENTIAL_ATOL) if sequential else (RTOL, ATOL)
        check = _check(f"selector pool {pool_size}", reference, scores, *tolerance)
        # the same picks, in the same order (a scorer's swap is only tolerated between tied scores)
        same = np.array_equal(top[0], expected)
        if not (
            same or (not sequential and np.allclose(reference[0][top[0]], reference[0][expected], rtol=0, atol=ATOL))
        ):
            raise XselError(f"parity check failed for the selector's picks at pool {pool_size}; no bundle was written")
        check["same_top_k"] = bool(same)
        if sequential:
            check["tolerance"] = {"rtol": SEQUENTIAL_RTOL, "atol": SEQUENTIAL_ATOL}
        checks.append(check)
    return checks


def _checkpoint_record(checkpoint) -> dict | None:
    """The selector's checkpoint by file name and SHA-256: the training machine's folders stay out of the bundle."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    return {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint)}


def quantize_encoder(
    folder: Path, encoder_entry: dict, selector_entry: dict | None, *, calibration, images: int, min_agreement
) -> dict:
    """Replace ``folder/encoder.onnx`` by its int8 form; returns the manifest's ``quantization`` record.

    onnxruntime static quantization in QDQ form (the form its CPU provider fuses into integer kernels): int8
    per-channel weights with a 7-bit range, so CPUs without VNNI do not saturate and every site computes what
    was checked here, and uint8 activations, the pairing x86 kernels are fastest with. Ranges are calibrated
    (MinMax) on a seeded sample of the ``calibration`` image table decoded as a site decodes it; on that sample the
    K site picks — the bundle's learned selector, else typiclust — must agree with the fp32 encoder's.
    """
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    table = calibration  # the ImageTable read when the request was checked
    sample, unreadable = _calibration_sample(table, encoder_entry["preprocessing"], images)
    fp32, prepared, int8 = folder / ENCODER_FILE, folder / ".encoder-prepared.onnx", folder / ".encoder-int8.onnx"
    logging.disable(logging.WARNING)  # the quantizer's notes on the root logger (e.g. skipped 1-d constants)
    try:
        quant_pre_process(str(fp32), str(prepared))  # shape inference and fusions, as onnxruntime recommends
        quantize_static(
            str(prepared),
            str(int8),
            _CalibrationBatches(encoder_entry["input"], sample),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        logging.disable(logging.NOTSET)
    prepared.unlink()
    onnx.checker.check_model(str(int8))
    reference, quantized = (_encode(path, encoder_entry, sample) for path in (fp32, int8))
    agreement = _selection_agreement(folder, selector_entry, reference, quantized, table.frame.iloc[sample.rows])
    agreement["required"] = min_agreement
    if agreement["picks_unchanged"] < min_agreement:
        raise XselError(
            f"int8 check failed: {agreement['picks_unchanged']:.0%} of the K={agreement['k']} {agreement['selector']} "
            f"picks on {len(sample.arrays)} calibration images are the fp32 encoder's (required {min_agreement:.0%}; "
            f"embedding cosine min {agreement['cosine_min']:.4f}); no bundle was written, export without --quantize"
        )
    os.replace(int8, fp32)
    return {
        "method": "onnxruntime static quantization",
        "precision": "int8",
        "format": "QDQ",
        "weights": "int8, per channel, 7-bit range",
        "activations": "uint8",
        "calibrate_method": "MinMax",
        "onnxruntime_version": ort_version,
        "calibration": {
            "source": table.csv_path.name,
            "source_sha256": table.source_sha256,
            "images": len(sample.arrays),
            "unreadable": unreadable,
            "seed": CALIBRATION_SEED,
        },
        "agreement": agreement,
    }


@dataclass(frozen=True)
class _Sample:
    """Decoded calibration images and the table rows they came from."""

    arrays: np.ndarray
    rows: list[int]


def _calibration_sample(table, preprocessing: dict, images: int) -> tuple[_Sample, int]:
    """Up to ``images`` readable images in a seeded random order of the table, and how many were unreadable."""
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(table.files))
    arrays, rows, unreadable = [], [], 0
    for row in order:
        if len(rows) == images:
            break
        array, error = decode_or_error(table.files[row], preprocessing)
        if error is None:
            arrays.append(array)
            rows.append(int(row))
        else:
            unreadable += 1
    if len(rows) < 2 * AGREEMENT_K:
        raise InputError(
            f"--calibration {table.csv_path}: {len(rows)} readable images ({unreadable} unreadable); the int8 "
            f"agreement check needs at least {2 * AGREEMENT_K}"
        )
    return _Sample(np.stack(arrays), rows), unreadable


class _CalibrationBatches:
    """onnxruntime's calibration reader protocol (``get_next`` → feed dict, ``None`` at the end) over the sample."""

    def __init__(self, input_name: str, sample: _Sample):
        self.batches = iter(
            {input_name: sample.arrays[start : start + CALIBRATION_BATCH]}
            for start in range(0, len(sample.arrays), CALIBRATION_BATCH)
        )

    def get_next(self):
        return next(self.batches, None)


def _encode(path: Path, encoder_entry: dict, sample: _Sample) -> np.ndarray:
    session, batch = make_session(path, "cpu"), CALIBRATION_BATCH
    return np.concatenate(
        [
            session.run([encoder_entry["output"]], {encoder_entry["input"]: sample.arrays[start : start + batch]})[0]
            for start in range(0, len(sample.arrays), batch)
        ]
    )


def _selection_agreement(folder: Path, selector_entry, reference, quantized, meta) -> dict:
    """The fraction of the K site picks that stay the same, and the embeddings' cosine agreement."""
    k = AGREEMENT_K
    if selector_entry is not None:  # the exported selector.onnx, fed as a site feeds it
        session = make_session(folder / SELECTOR_FILE, "cpu")
        features = PoolFeatures.from_dict(selector_entry.get("features", {}))
        name, inputs = selector_entry["name"], selector_entry["inputs"]

        def picks(embeddings):
            pool = features.inputs(embeddings, meta)[None].astype(np.float32)
            feed = {inputs["pool"]: pool, inputs["k"]: np.array(k, np.int64)}
            return session.run([selector_entry["outputs"]["top_indices"]], feed)[0][0]
    else:
        name, baseline = "typiclust", create_selector("typiclust")

        def picks(embeddings):
            return baseline.select(embeddings, k, seed=CALIBRATION_SEED)

    unchanged = len(set(np.asarray(picks(reference)).tolist()) & set(np.asarray(picks(quantized)).tolist())) / k
    cosine = (reference * quantized).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1) + 1e-12
    )
    return {
        "selector": name,
        "k": k,
        "pool": len(reference),
        "picks_unchanged": unchanged,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }
