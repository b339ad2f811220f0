"""Exported bundles at a hospital site: verify, load and run them with onnxruntime only (no torch).

A bundle is a folder with ``encoder.onnx``, optionally ``selector.onnx`` (a learned selector) and
``trust_reference.npy`` (its trust gate's reference rows, :mod:`xsel.trust`), and ``manifest.json`` (schema
version, preprocessing, input/output names, SHA-256 of every file, parity results). Loading verifies the schema and
every hash and refuses anything else; the .npy is read with ``allow_pickle=False``, so no file of a bundle runs code.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xsel.errors import InputError
from xsel.identity import encoder_identity
from xsel.io.decoding import BatchDecoder
from xsel.io.images import check_preprocessing, unknown_preprocessing
from xsel.io.table import file_sha256
from xsel.progress import notify, progress_bar
from xsel.selectors import PoolFeatures
from xsel.trust import StaleGateError, TrustGate

BUNDLE_SCHEMA = 2  # 2: the selector entry names its plugin and input features (any learned selector)
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
SELECTOR_FILE = "selector.onnx"
TRUST_FILE = "trust_reference.npy"  # the learned selector's trust gate reference, when it has one
ENCODER_REPLICAS = 4  # most sessions of one image encoder on a CPU (one per core below that)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InputError(
            "onnxruntime is not installed: pip install 'xsel[cpu]' (or 'xsel[gpu]' on a CUDA machine; install one)"
        ) from None
    return onnxruntime


def make_session(model: Path | bytes, device: str = "auto", *, spinning: bool = True, threads: int | None = None):
    """An onnxruntime session of ``model`` (a file, or its bytes) on CUDA when asked for (or available with
    ``auto``), else on CPU.

    ``cuda`` that ends up on the CPU is an error; ``auto`` falls back with a one-line notice. ``spinning=False``
    for an encoder whose runs alternate with decoding on the same cores: its idle threads then sleep instead of
    spinning on the decoders' cores (EfficientNet-Lite0 embedded 5–7% faster on two cores, resnet18 0–3%).
    ``threads``: intra-op threads (default: one per core).
    """
    ort = import_onnxruntime()
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device}: choose one of auto, cpu, cuda")
    wants_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers())
    providers = ["CPUExecutionProvider"]
    if wants_cuda:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # lets the CUDA provider find the CUDA/cuDNN libraries of the nvidia wheels
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the fallback is reported below, in one line
    with warnings.catch_warnings():  # onnxruntime warns when a requested provider is absent: reported below
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)
    running = session.get_providers()
    if wants_cuda and running[0] != "CUDAExecutionProvider":
        if device == "cuda":
            raise InputError("--device cuda: onnxruntime could not start its CUDA provider; use --device cpu or auto")
        notify("CUDA provider unavailable, running on the CPU")
    return session


class MicroBatchTuner:
    """Which run size a CPU replica's slice of a batch goes through onnxruntime in, measured on the first batches.

    Outputs do not depend on it (onnxruntime's CPU kernels compute each image alike at any batch size: bitwise equal
    here), speed does, the opposite way per model: forward pass alone, two replicas, EfficientNet-Lite0 ran 249
    images/s one image at a time against 207 with the whole slice (its layers are bound by memory traffic: one
    image's activations are likelier to be in cache at the next layer), densenet121 50 against 46, resnet18 88
    against 100 (its convolutions reuse each weight across the images). The candidates run in turn, a batch each: a
    first round unmeasured (a session's first run at a new input shape is slow, up to 6× here), then
    ``TUNING_ROUNDS`` measured; the fastest per image is kept for the rest of the run."""

    CANDIDATES = (1, 4, None)  # images per run; None: the whole slice
    TUNING_ROUNDS = 2

    def __init__(self):
        self._batches = 0
        self._seconds = {size: 0.0 for size in self.CANDIDATES}
        self._images = dict.fromkeys(self.CANDIDATES, 0)
        self.chosen: int | None = None

    @property
    def settled(self) -> bool:
        """Whether the run size is chosen for the rest of the run."""
        return self._batches > (1 + self.TUNING_ROUNDS) * len(self.CANDIDATES)

    def size(self) -> int | None:
        """The run size for the next batch."""
        if self.settled or self._batches == 0:
            return self.chosen
        return self.CANDIDATES[(self._batches - 1) % len(self.CANDIDATES)]

    def record(self, size: int | None, seconds: float, images: int) -> None:
        """One batch of ``images`` took ``seconds`` at run size ``size``."""
        if self.settled:
            return
        if self._batches > len(self.CANDIDATES):  # after the first batch (it opens the replicas) and the first round
            self._seconds[size] += seconds
            self._images[size] += images
        self._batches += 1
        if self.settled:
            self.chosen = min(self.CANDIDATES, key=lambda c: self._seconds[c] / self._images[c])


class EncoderReplicas:
    """An image encoder as ``pixels (B, C, H, W) → embeddings (B, D)`` over onnxruntime sessions: one on an
    accelerator; on a CPU one per core up to ``ENCODER_REPLICAS`` (opened at the first batch), the cores shared out,
    each session encoding a slice of every batch at the same time: fewer thread hand-offs per layer. On two cores,
    against one 2-thread session, ``xsel embed`` ran EfficientNet-Lite0 +9% and densenet121 +13% faster, resnet18
    within noise (BENCHMARKS.md section 10). On a CPU each slice runs in the size :class:`MicroBatchTuner` found
    fastest. Each replica holds its own copy of the weights. ``open_session(threads)`` opens one session."""

    def __init__(self, open_session: Callable[[int], object], input_name: str, output_name: str):
        cores = os.cpu_count() or 1
        self._open, self._replicas = open_session, min(cores, ENCODER_REPLICAS)
        self._threads_each = cores // self._replicas
        self.sessions = [open_session(self._threads_each)]  # the rest on the first batch: a reused store needs none
        self.on_accelerator = self.sessions[0].get_providers()[0] != "CPUExecutionProvider"
        self.input_name, self.output_name = input_name, output_name
        self.tuner = MicroBatchTuner()
        self._threads = None

    def _run(self, session, pixels: np.ndarray, size: int | None = None) -> np.ndarray:
        if size is None or size >= len(pixels):
            return session.run([self.output_name], {self.input_name: pixels})[0]
        return np.concatenate(
            [self._run(session, pixels[start : start + size]) for start in range(0, len(pixels), size)]
        )

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.on_accelerator or len(pixels) < 2:
            return self._run(self.sessions[0], pixels)
        if self._threads is None:
            self.sessions += [self._open(self._threads_each) for _ in range(self._replicas - 1)]
            self._threads = ThreadPoolExecutor(self._replicas, thread_name_prefix="xsel-encoder")
        slices = [part for part in np.array_split(pixels, len(self.sessions)) if len(part)]
        size = self.tuner.size()
        began = time.perf_counter()
        encoded = np.concatenate(list(self._threads.map(self._run, self.sessions, slices, [size] * len(slices))))
        self.tuner.record(size, time.perf_counter() - began, len(pixels))
        return encoded


@dataclass
class Bundle:
    """A verified bundle: its folder and manifest, the learned selector's trust gate (None without one); sessions
    are created on demand."""

    path: Path
    manifest: dict
    device: str = "auto"
    trust_gate: TrustGate | None = None
    _sessions: dict = field(default_factory=dict)
    _encoder: EncoderReplicas | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Bundle:
        """Read and verify a bundle: manifest schema, the files it names, and each file's SHA-256."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise InputError(f"{path}: not a bundle (no {MANIFEST}); export one with `xsel export`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{manifest_path}: not valid JSON; re-export the bundle") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
            raise InputError(f"{manifest_path}: not an xsel bundle manifest; re-export the bundle")
        version = manifest.get("schema_version")
        if version == 1:
            manifest = _from_schema_1(manifest)
        elif version != BUNDLE_SCHEMA:
            raise InputError(
                f"{manifest_path}: bundle schema {version!r}, this xsel reads schemas 1 and {BUNDLE_SCHEMA}; "
                "update xsel or re-export the bundle with this version"
            )
        files = manifest["sha256"]
        unknown = unknown_preprocessing(manifest.get("encoder", {}).get("preprocessing", {}))
        if unknown:
            raise InputError(
                f"{manifest_path}: the encoder needs preprocessing this xsel does not know ({', '.join(unknown)}); "
                "update xsel"
            )
        if "encoder" in manifest:  # a manifest without one is refused below, naming what it lacks
            preprocessing = manifest["encoder"].get("preprocessing")
            check_preprocessing(preprocessing, source=f"{manifest_path}: encoder preprocessing")
        gated = bool((manifest.get("selector") or {}).get("trust_gate"))
        needed = [ENCODER_FILE, *([SELECTOR_FILE] if manifest.get("selector") else []), *([TRUST_FILE] * gated)]
        missing = [name for name in needed if name not in files] + [k for k in ("encoder",) if k not in manifest]
        if missing:
            raise InputError(f"{manifest_path}: lists no {', '.join(missing)}; re-export the bundle")
        for name, digest in files.items():
            if Path(name).name != name:
                raise InputError(f"{manifest_path}: file name {name!r} leaves the bundle folder")
            if not (path / name).is_file():
                raise InputError(f"{path}: {name} is missing; the bundle is incomplete, copy it again")
            if file_sha256(path / name) != digest:
                raise InputError(f"{path / name}: SHA-256 does not match the manifest; the bundle was modified")
        extra = sorted(entry.name for entry in path.iterdir() if entry.name not in {MANIFEST, *files})
        if extra:
            notify(f"{path} holds files its manifest does not list ({', '.join(extra[:3])}); they are not used")
        bundle = cls(path=path, manifest=manifest, device=device)
        bundle._check_models()
        if gated:
            bundle.trust_gate = _read_trust_gate(path / TRUST_FILE, manifest["selector"]["trust_gate"])
        return bundle

    def _check_models(self) -> None:
        """Open every model and compare its inputs and outputs with the manifest: a model swapped for another
        valid one (and re-hashed into the manifest) is refused here, naming the file, not deep in onnxruntime."""
        encoder = self.encoder
        pre = encoder["preprocessing"]
        size, channels, dim = int(pre["image_size"]), int(pre["channels"]), int(encoder["embedding_dim"])
        _check_signature(
            self.path / ENCODER_FILE,
            self.encode.sessions[0],
            inputs={encoder["input"]: ("float", (None, channels, size, size))},
            outputs={encoder["output"]: ("float", (None, dim))},
        )
        selector = self.selector
        if selector:
            width = selector.get("input_dim") or PoolFeatures.from_dict(selector.get("features", {})).width(dim)
            _check_signature(
                self.path / SELECTOR_FILE,
                self.session(SELECTOR_FILE),
                inputs={
                    selector["inputs"]["pool"]: ("float", (None, None, width)),
                    selector["inputs"]["k"]: ("int64", ()),
                },
                outputs={
                    selector["outputs"]["scores"]: ("float", (None, None)),
                    selector["outputs"]["top_indices"]: ("int64", (None, None)),
                },
            )

    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    @property
    def encoder_identity(self) -> dict:
        """The identity of the bundle's encoder, as a store made with it records it."""
        return encoder_identity(self.encoder["name"], self.encoder["weights_sha256"], self.encoder["preprocessing"])

    @property
    def selector(self) -> dict | None:
        return self.manifest.get("selector")

    @property
    def encode(self) -> EncoderReplicas:
        """The bundle's encoder, ``pixels → embeddings``."""
        if self._encoder is None:
            encoder = self.encoder
            model = (self.path / ENCODER_FILE).read_bytes()  # once: every replica runs the bytes verified at load
            opened = lambda threads: self._open(ENCODER_FILE, model, threads=threads, spinning=False)  # noqa: E731
            self._encoder = EncoderReplicas(opened, encoder["input"], encoder["output"])
        return self._encoder

    def session(self, name: str):
        if name not in self._sessions:
            self._sessions[name] = self._open(name, self.path / name)
        return self._sessions[name]

    def _open(self, name: str, model: Path | bytes, **options):
        try:
            return make_session(model, self.device, **options)
        except Exception as error:  # onnxruntime's own errors share no base class but Exception
            if not type(error).__module__.startswith("onnxruntime"):
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            message = f"{self.path / name}: onnxruntime cannot load it ({first}); re-export the bundle"
            raise InputError(message) from None

    def embed_files(self, files: list[Path], *, batch_size: int = 32, workers: int | None = None, show_progress=True):
        """Decode (worker processes, :class:`~xsel.io.decoding.BatchDecoder`) and encode images: (embeddings of the
        readable ones, their indices, errors)."""
        encode = self.encode
        decoder = BatchDecoder(self.encoder["preprocessing"], batch_size, workers, overlap=encode.on_accelerator)
        kept, outputs, errors = [], [], []
        with decoder, progress_bar("Encoding", total=len(files), show=show_progress) as advance:
            for rows, pixels, failed in decoder.batches(files, range(len(files))):
                if len(rows):
                    outputs.append(encode(pixels))
                    kept.extend(rows.tolist())
                errors.extend(failed)
                advance(len(rows) + len(failed))
        dim = int(self.encoder["embedding_dim"])
        embeddings = np.concatenate(outputs) if outputs else np.zeros((0, dim), np.float32)
        return embeddings.astype(np.float32), np.asarray(kept, dtype=np.int64), errors

    def scores(self, pool_inputs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The learned selector on one pool (N, D′) in store order: (scores (N,), top-k indices)."""
        selector = self.selector
        session = self.session(SELECTOR_FILE)
        scores, top = session.run(
            [selector["outputs"]["scores"], selector["outputs"]["top_indices"]],
            {
                selector["inputs"]["pool"]: pool_inputs[None].astype(np.float32),
                selector["inputs"]["k"]: np.array(k, np.int64),
            },
        )
        return scores[0], top[0]


def _read_trust_gate(path: Path, record: dict) -> TrustGate:
    """The selector's trust gate from its manifest record and reference rows. ``allow_pickle=False``: an object
    array (a pickle inside the .npy) is refused unread, never unpickled."""
    try:
        reference = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a plain array of reference rows ({first}); re-export the bundle") from None
    if not isinstance(reference, np.ndarray) or not np.issubdtype(reference.dtype, np.floating):
        raise InputError(f"{path}: holds {getattr(reference, 'dtype', type(reference).__name__)}, not float rows")
    try:
        return TrustGate.from_record(record, reference)
    except StaleGateError as error:  # its message says to recalibrate, then export again
        raise InputError(f"{path}: {error}") from None
    except InputError as error:
        raise InputError(f"{path}: {error}; re-export the bundle") from None


def _from_schema_1(manifest: dict) -> dict:
    """A schema-1 manifest (xsel ≤ 0.9: MedSelect was the only learned selector) read as schema 2: the same models,
    its selector entry rewritten to name the plugin and its input features."""
    selector = manifest.get("selector")
    if not selector:
        return manifest
    metadata = ["sex", "age", "frontal"] if selector.get("use_metadata") else []
    features = {"metadata": metadata, "age_mean": selector.get("age_mean", 0.0), "age_std": selector.get("age_std", 1)}
    details = {"trained_k": selector.get("trained_k"), "conditions": selector.get("conditions", [])}
    return {**manifest, "selector": {**selector, "name": "medselect", "features": features, "details": details}}


def _check_signature(path: Path, session, *, inputs: dict, outputs: dict) -> None:
    """Each named input and output has the manifest's element type, rank and static sizes (None: any size); the
    model takes no other input."""
    for kind, declared, args in (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs())):
        found = {arg.name: arg for arg in args}
        if kind == "input" and set(found) != set(declared):
            raise InputError(
                f"{path}: inputs {sorted(found)}, the manifest expects {sorted(declared)}; the model is not the one "
                "exported, re-export the bundle"
            )
        for name, (dtype, dims) in declared.items():
            arg = found.get(name)
            if arg is None:
                raise InputError(f"{path}: no {kind} named {name!r} ({sorted(found)}); re-export the bundle")
            shape = list(arg.shape)
            sizes_differ = any(
                want is not None and isinstance(have, int) and have != want
                for have, want in zip(shape, dims, strict=False)  # rank compared below
            )
            if arg.type != f"tensor({dtype})" or len(shape) != len(dims) or sizes_differ:
                expected = "[" + ", ".join("?" if want is None else str(want) for want in dims) + "]"
                raise InputError(
                    f"{path}: {kind} {name!r} is {arg.type} {shape}, the manifest expects tensor({dtype}) {expected}; "
                    "the model is not the one exported, re-export the bundle"
                )
