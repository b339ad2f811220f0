"""``xsel train encoder`` as a library call: unlabeled images → a self-supervised domain encoder.

The run folder holds ``encoder.pt`` (the backbone's state dict plus an ``xsel`` record of method,
architecture and preprocessing, read by ``xsel embed`` / ``xsel export``), ``last.pt`` (everything needed
to resume: settings, module, optimizer, schedule, position in the epoch) and ``metrics.csv`` (one row per
epoch, with the few-shot probe AUROC when a probe store is given; row 0 is the untrained starting point).

Resume works as in nanoGPT: the run goes on with the settings saved in its ``last.pt``; a setting asked for
again must match them, except those in ``RESUMABLE``. The loop reads top-down in :func:`train_encoder`:
settings → images → model → (restore) → epochs of steps, each epoch closed by the probe and a checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF

from xsel.encoders import create_encoder
from xsel.errors import InputError, XselError
from xsel.evaluate import evaluate
from xsel.io.images import decode_or_error
from xsel.io.table import read_image_table, write_csv_atomic, write_errors_csv
from xsel.progress import notify, progress_bar
from xsel.resume import resumed_settings
from xsel.store import Store, read_store
from xsel.train.checkpoints import read_checkpoint, save_torch_atomic
from xsel.train.pretext import METHODS, PretextMethod, augment, build_method, normalize, view_crops
from xsel.train.runtime import autocast_dtype, one_cycle, resolve_device

ENCODER = "encoder.pt"
LAST = "last.pt"
METRICS = "metrics.csv"
ERRORS = "errors.csv"
RUN_FORMAT = "xsel-encoder-run-1"
PROBE_POOL_SIZE = 100
PROBE_QUERY_SIZE = 40
MIN_IMAGE_SIZE = 32
# Settings that may change when a run is resumed: they do not change what is learned.
RESUMABLE = ("max_minutes", "workers")


@dataclass
class EncoderTrainingConfig:
    """Everything that defines a run; saved in ``last.pt`` and ``encoder.pt``, and the settings a resumed run
    goes on with."""

    method: str = "moco"
    arch: str = "resnet18"
    weights: str = "none"  # starting point: none (seeded random init), imagenet or a file
    image_size: int = 128
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1  # OneCycle: share of the steps spent warming up
    grad_clip: float = 3.0
    projection_dim: int = 128
    temperature: float | None = None  # None: the method's default (see xsel.train.pretext.TEMPERATURES)
    queue_size: int | None = None  # MoCo; None: 4096, or fewer when the images are few (see queue_length)
    momentum: float = 0.99
    prototypes: int = 100
    small_crops: int = 2
    balance_by: str | None = None  # a CSV column: WeightedRandomSampler with inverse-frequency weights
    probe_conditions: list[str] = field(default_factory=list)
    probe_negative: str = "No Finding"
    probe_episodes: int = 30
    probe_k: int = 20
    probe_classifier: str = "cosine"
    precision: str = "auto"
    max_minutes: float | None = None
    workers: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class EncoderTrainResult:
    """What a call of :func:`train_encoder` did; ``config`` is the run's (the saved one when resumed)."""

    run_dir: Path
    encoder_path: Path
    epochs: float
    steps: int
    seconds: float
    stopped_by: str
    images_per_second: float
    final_loss: float
    probe_auroc: float | None
    failed_images: int
    config: EncoderTrainingConfig


@dataclass(frozen=True)
class RunInputs:
    """Where the images and the probe are: not settings (a moved folder may be given anew), but remembered in
    ``last.pt`` so that ``--resume`` needs none of them again."""

    image_root: str | None = None
    probe_store: str | None = None
    probe_image_root: str | None = None


@dataclass(frozen=True)
class TrainingData:
    """The CSV's images and the schedule they set."""

    paths: list[str]  # the CSV's Path values, as errors.csv lists them
    files: list[Path]  # resolved
    weights: np.ndarray | None  # --balance-by sampling weights
    steps_per_epoch: int
    total_steps: int
    sha256: str  # of the image list: a resumed run must see the same images in the same order


@dataclass
class Learner:
    """The network being trained and what updates it."""

    module: PretextMethod
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    preprocessing: dict

    @property
    def backbone(self) -> torch.nn.Module:
        return self.module.backbone

    @property
    def arithmetic(self) -> str:
        """What a resumed run must compute in to continue exactly: ``fp32``, ``torch.bfloat16``, …"""
        return str(self.amp_dtype or "fp32")


@dataclass
class RunState:
    """Where the run stands; saved in ``last.pt`` after every epoch (but ``started``, ``stopped_by`` and
    ``recent_losses``, which belong to this invocation)."""

    step: int = 0  # optimizer steps taken (batches seen, counting those lost to decode failures)
    seconds: float = 0.0  # training time of the earlier invocations
    history: list[dict] = field(default_factory=list)  # metrics.csv rows
    failed: dict[int, str] = field(default_factory=dict)  # image index → why it could not be decoded
    started: float = field(default_factory=time.perf_counter)  # --max-minutes budgets this invocation
    stopped_by: str = "epochs"
    recent_losses: deque = field(default_factory=lambda: deque(maxlen=20))  # the progress bar's running loss

    def elapsed(self) -> float:
        """Training seconds of the whole run, this invocation included."""
        return self.seconds + time.perf_counter() - self.started

    def out_of_time(self, max_minutes: float | None) -> bool:
        return max_minutes is not None and time.perf_counter() - self.started > max_minutes * 60


def train_encoder(
    csv: str | Path,
    run_dir: str | Path,
    config: EncoderTrainingConfig | dict | None = None,
    *,
    image_root: str | Path | None = None,
    probe_store: str | Path | None = None,
    probe_image_root: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    show_progress: bool = True,
) -> EncoderTrainResult:
    """Pretrain ``config.arch`` on the images of ``csv`` with ``config.method``; files in ``run_dir``.

    ``config`` is a full :class:`EncoderTrainingConfig`, a dict of settings (the rest at their defaults) or
    None (all defaults). With ``resume`` and a ``last.pt`` in ``run_dir``, the run goes on with the settings
    saved there: a dict then lists only the settings asked for again, a full config asks for every one, None
    for none; asking to change one outside ``RESUMABLE`` is refused, naming it. ``image_root``, the probe's
    store and folder, and ``device`` (None: auto) left out on resume are the saved ones. ``probe_store``'s
    Paths are resolved against ``probe_image_root`` (default: ``image_root``, else the CSV's folder, right
    when the probe store was embedded from the same CSV).
    """
    run_dir = Path(run_dir)
    saved = _previous_run(run_dir, resume)
    config = resolve_config(config, None if saved is None else saved["config"], run_dir / LAST)
    inputs = _run_inputs(saved, image_root, probe_store, probe_image_root)
    _check_config(config, inputs.probe_store)
    data = _read_training_data(csv, inputs.image_root, config, show_progress)
    torch_device = resolve_device(device or (saved["device"] if saved else "auto"))
    amp_dtype = autocast_dtype(config.precision, torch_device)
    backbone = _create_backbone(config)
    probe = None
    if inputs.probe_store is not None:
        root = Path(inputs.probe_image_root or inputs.image_root or Path(csv).resolve().parent)
        probe = _Probe(Path(inputs.probe_store), root, config, dict(backbone.preprocessing))
    learner = _build_learner(config, data, backbone, torch_device, amp_dtype)

    state = RunState()
    if saved is not None:
        state = _restore_run(learner, saved, data, run_dir / LAST)
    elif probe is not None:
        state.history.append({"epoch": 0, "step": 0, **probe.run(learner.backbone, learner.device)})
    run_dir.mkdir(parents=True, exist_ok=True)
    crops = view_crops(config.method, config.image_size, config.small_crops)
    dataset = _ViewDataset(data.files, crops, config.seed, config.image_size)
    workers = config.workers if config.workers is not None else max(1, min(4, (os.cpu_count() or 2) // 2))

    state.started = time.perf_counter()
    learner.module.train()
    with progress_bar("Pretraining", total=data.total_steps, unit="steps", show=show_progress) as advance:
        advance(state.step)
        while state.step < data.total_steps and state.stopped_by == "epochs":
            row, images_used = _train_epoch(learner, dataset, data, config, state, workers, advance)
            if probe is not None:
                row.update(probe.run(learner.backbone, learner.device))
            state.history.append(row)
            failed = sorted(state.failed)
            write_errors_csv(run_dir / ERRORS, [data.paths[i] for i in failed], [state.failed[i] for i in failed])
            if images_used == 0 and state.stopped_by == "epochs":
                example = next(iter(state.failed.values()), "batches too small")
                raise InputError(
                    f"{csv}: no image of this epoch could be used ({len(state.failed)} failed to decode, e.g. "
                    f"{example}); see {run_dir / ERRORS} and check the paths or --image-root"
                )
            _save_run(run_dir, config, data, learner, state, inputs)
    if state.failed:
        notify(f"{len(state.failed)} images could not be decoded and were skipped; see {run_dir / ERRORS}")
    return _outcome(run_dir, config, data, state)


def _previous_run(run_dir: Path, resume: bool) -> dict | None:
    """The ``last.pt`` to continue from, or None for a new run; a run folder in use needs ``resume``."""
    if not resume:
        if any((run_dir / name).exists() for name in (LAST, ENCODER, METRICS)):
            raise InputError(
                f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
            )
        return None
    return load_run_state(run_dir / LAST) if (run_dir / LAST).exists() else None


def load_run_state(path: Path) -> dict:
    """Read ``last.pt`` safely; a foreign or damaged file is a one-line InputError."""
    return read_checkpoint(path, file_format=RUN_FORMAT, kind="encoder training", made_by="xsel train encoder")[1]


def resolve_config(
    config: EncoderTrainingConfig | dict | None, saved: dict | None, where: str | Path
) -> EncoderTrainingConfig:
    """The settings of this run: ``config`` for a new run; for a resumed one (``saved``), the saved settings
    with ``config``'s changes, refused (naming them) unless they are ``RESUMABLE``."""
    known = [f.name for f in fields(EncoderTrainingConfig)]
    requested = asdict(config) if isinstance(config, EncoderTrainingConfig) else dict(config or {})
    unknown = sorted(set(requested) - set(known))
    if unknown:
        raise InputError(f"unknown encoder training settings {', '.join(unknown)}; known: {', '.join(known)}")
    if saved is not None:
        requested = resumed_settings(
            saved,
            requested,
            where=where,
            may_change=RESUMABLE,
            hint="resume without them to go on as saved, or start a new --out",
        )
    return EncoderTrainingConfig(**{key: value for key, value in requested.items() if key in known})


def _run_inputs(saved: dict | None, image_root, probe_store, probe_image_root) -> RunInputs:
    """The folders and probe store given this time, each of the others taken from the run being resumed."""
    before = (saved or {}).get("inputs", {})
    given = {"image_root": image_root, "probe_store": probe_store, "probe_image_root": probe_image_root}
    return RunInputs(
        **{key: before.get(key) if value is None else str(Path(value).resolve()) for key, value in given.items()}
    )


def _check_config(config: EncoderTrainingConfig, probe_store) -> None:
    """Refuse settings that cannot train, before any image is read."""
    if config.method not in METHODS:
        raise InputError(f"--method {config.method}: choose one of {', '.join(METHODS)}")
    for name, value, least in (
        ("--epochs", config.epochs, 1),
        ("--batch-size", config.batch_size, 2),
        ("--image-size", config.image_size, MIN_IMAGE_SIZE),
        ("--projection-dim", config.projection_dim, 1),
        ("--prototypes", config.prototypes, 1),
        ("--small-crops", config.small_crops, 0),
        ("--workers", config.workers if config.workers is not None else 0, 0),
        ("--seed", config.seed, 0),
        ("--probe-episodes", config.probe_episodes, 1),
        ("--probe-k", config.probe_k, 1),
    ):
        if value < least:
            raise InputError(f"{name} {value}: use at least {least}")
    for name, value in (
        ("--learning-rate", config.learning_rate),
        ("--grad-clip", config.grad_clip),
        ("--temperature", 1.0 if config.temperature is None else config.temperature),
    ):
        if not value > 0:
            raise InputError(f"{name} {value}: must be positive")
    if not 0 <= config.momentum < 1 or config.weight_decay < 0:
        raise InputError("--momentum must lie in [0, 1) and --weight-decay be 0 or more")
    if config.method == "moco" and config.queue_size is not None and config.queue_size < config.batch_size:
        raise InputError(f"--queue-size {config.queue_size}: use at least the batch size ({config.batch_size})")
    if bool(config.probe_conditions) != (probe_store is not None):
        raise InputError("--probe-store and --probe-conditions go together: give both or neither")


def _read_training_data(csv, image_root, config: EncoderTrainingConfig, show_progress: bool) -> TrainingData:
    """Read the CSV and derive the schedule; fewer images than one batch is an input error."""
    table = read_image_table(csv, image_root, show_progress=show_progress)
    steps_per_epoch = len(table.files) // config.batch_size
    if steps_per_epoch == 0:
        raise InputError(
            f"{csv}: {len(table.files)} images is fewer than one batch (--batch-size {config.batch_size}); "
            "lower --batch-size or add images"
        )
    return TrainingData(
        paths=table.paths,
        files=table.files,
        weights=balance_weights(table.frame, config.balance_by) if config.balance_by else None,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs,
        sha256=hashlib.sha256("\n".join(map(str, table.paths)).encode()).hexdigest(),
    )


def balance_weights(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Inverse-frequency weights of a column's values (blank is a value too): each value is drawn equally."""
    if column not in frame.columns:
        raise InputError(f"--balance-by {column!r}: no such column; columns: {', '.join(map(str, frame.columns))}")
    values = frame[column].astype(str).where(frame[column].notna(), "")
    counts = values.map(values.value_counts())
    return (1.0 / counts.to_numpy(dtype=np.float64)).astype(np.float64)


def _create_backbone(config: EncoderTrainingConfig) -> torch.nn.Module:
    """The encoder plugin's network at its starting weights; one with nothing to train is refused."""
    backbone = create_encoder(config.arch, weights=config.weights, image_size=config.image_size)
    if not any(p.requires_grad for p in backbone.parameters()):
        raise InputError(f"--arch {config.arch}: this encoder has no trainable weights; choose a CNN like resnet18")
    return backbone


def queue_length(config: EncoderTrainingConfig, n_images: int) -> int:
    """MoCo's queue: ``queue_size`` if set, else 4096 capped at half the images (whole batches), so the queue
    never holds a stale key of the very image being contrasted."""
    if config.queue_size is not None:
        return config.queue_size
    return max(config.batch_size, min(4096, (n_images // 2) // config.batch_size * config.batch_size))


def _build_learner(
    config: EncoderTrainingConfig, data: TrainingData, backbone, device: torch.device, amp_dtype
) -> Learner:
    """The pretext module around ``backbone`` (its heads seeded by ``config.seed``), AdamW, OneCycle, AMP scaler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        module = build_method(
            config.method,
            backbone,
            projection_dim=config.projection_dim,
            temperature=config.temperature,
            queue_size=queue_length(config, len(data.files)),
            momentum=config.momentum,
            prototypes=config.prototypes,
            total_steps=data.total_steps,
            freeze_prototype_steps=data.steps_per_epoch,
        )
    module.to(device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = one_cycle(optimizer, config.learning_rate, data.total_steps, config.warmup_fraction)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Learner(module, trainable, optimizer, scheduler, scaler, device, amp_dtype, dict(backbone.preprocessing))


def _restore_run(learner: Learner, saved: dict, data: TrainingData, where: Path) -> RunState:
    """Load ``last.pt`` into ``learner``; it must come from the same image list and the same arithmetic (the
    settings were checked by :func:`resolve_config`)."""
    if saved["images_sha256"] != data.sha256:
        raise InputError(
            f"{where} was trained on another image list ({saved['n_images']} images, now {len(data.files)}); "
            "resume with the same CSV or start a new --out"
        )
    if saved["arithmetic"] != learner.arithmetic:
        raise InputError(
            f"{where} was trained in {saved['arithmetic']} on {saved['device']}, this run would use "
            f"{learner.arithmetic} on {learner.device.type}; resume with the same --device and --precision"
        )
    learner.module.load_state_dict(saved["module"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        learner.scaler.load_state_dict(saved["scaler"])
    return RunState(
        step=saved["step"], seconds=saved["seconds"], history=saved["history"], failed=dict(saved["failed"])
    )


def _save_run(
    run_dir: Path, config: EncoderTrainingConfig, data: TrainingData, learner: Learner, state: RunState, inputs
) -> None:
    """Write ``encoder.pt``, ``last.pt`` and ``metrics.csv``, each replaced atomically."""
    epochs_done = state.step / data.steps_per_epoch
    payload = _encoder_payload(learner.backbone, config, learner.preprocessing, state.step, epochs_done)
    save_torch_atomic(payload, run_dir / ENCODER)
    save_torch_atomic(
        {
            "format": RUN_FORMAT,
            "module": learner.module.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(),
            "config": asdict(config),
            "inputs": asdict(inputs),
            "images_sha256": data.sha256,
            "n_images": len(data.files),
            "arithmetic": learner.arithmetic,
            "device": learner.device.type,
            "step": state.step,
            "seconds": state.elapsed(),
            "history": state.history,
            "failed": sorted(state.failed.items()),
        },
        run_dir / LAST,
    )
    write_csv_atomic(pd.DataFrame(state.history), run_dir / METRICS)


def _encoder_payload(backbone, config: EncoderTrainingConfig, preprocessing: dict, step: int, epochs: float) -> dict:
    """``encoder.pt``: the backbone's state dict (what ``--weights`` loads) and the record ``embed`` reads."""
    return {
        "state_dict": {key: value.detach().cpu() for key, value in backbone.state_dict().items()},
        "xsel": {
            "kind": "encoder",
            "encoder": config.arch,
            "method": config.method,
            "preprocessing": preprocessing,
            "steps": step,
            "epochs": epochs,
        },
        "config": asdict(config),
    }


class _ViewDataset:
    """Decodes an image and draws its views in DataLoader workers; a failure travels as a message."""

    def __init__(self, files: list[Path], crops, seed: int, image_size: int):
        self.files, self.crops, self.seed = files, crops, seed
        self.max_side = 2 * image_size  # shrink big radiographs once, before rotating and cropping

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        decoded, error = decode_or_error(self.files[index], None)
        if error is not None:
            return index, error
        gray = torch.from_numpy(decoded)[None]
        if max(gray.shape[-2:]) > self.max_side:
            scale = self.max_side / max(gray.shape[-2:])
            size = [max(2, round(gray.shape[-2] * scale)), max(2, round(gray.shape[-1] * scale))]
            gray = TF.resize(gray, size, antialias=True)
        rng = np.random.default_rng([self.seed, epoch, index])
        return index, [augment(gray, crop, rng) for crop in self.crops]


def _collate_views(items):
    """Stack the decoded items view by view; failures come back as (index, message) pairs."""
    good = [views for _, views in items if not isinstance(views, str)]
    failed = [(index, views) for index, views in items if isinstance(views, str)]
    stacked = [torch.stack([views[v] for views in good]) for v in range(len(good[0]))] if good else []
    return stacked, failed


def epoch_order(n: int, epoch: int, config: EncoderTrainingConfig, weights: np.ndarray | None) -> list[int]:
    """The images of one epoch, in order: a seeded permutation, or a ``WeightedRandomSampler`` draw."""
    generator = torch.Generator().manual_seed(int(np.random.default_rng([config.seed, epoch]).integers(2**62)))
    if weights is None:
        return torch.randperm(n, generator=generator).tolist()
    sampler = torch.utils.data.WeightedRandomSampler(weights.tolist(), n, replacement=True, generator=generator)
    return list(sampler)


def _train_epoch(
    learner: Learner,
    dataset: _ViewDataset,
    data: TrainingData,
    config: EncoderTrainingConfig,
    state: RunState,
    workers: int,
    advance: Callable,
) -> tuple[dict, int]:
    """Train from ``state.step`` to the end of its epoch, or until the time budget runs out; returns the
    epoch's metrics row and how many images it trained on."""
    epoch, position = divmod(state.step, data.steps_per_epoch)
    order = epoch_order(len(data.files), epoch, config, data.weights)[: data.steps_per_epoch * config.batch_size]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=[(epoch, index) for index in order[position * config.batch_size :]],
        num_workers=workers,
        collate_fn=_collate_views,
        pin_memory=learner.device.type == "cuda",
        persistent_workers=False,
    )
    started, images, losses = time.perf_counter(), 0, []
    for views, failures in loader:
        state.failed.update((int(index), message) for index, message in failures)
        state.step += 1
        loss = _train_step(learner, views, state.step, config)
        if loss is not None:
            state.recent_losses.append(loss)
            losses.append(loss)
            images += len(views[0])
        rate = images / max(time.perf_counter() - started, 1e-9)
        advance(1, status=f"loss {np.mean(state.recent_losses):.3f} · {rate:.0f} img/s" if state.recent_losses else "")
        if state.out_of_time(config.max_minutes):
            state.stopped_by = "time budget"
            break
    row = {
        "epoch": round(state.step / data.steps_per_epoch, 4),
        "step": state.step,
        "loss": float(np.mean(losses)) if losses else math.nan,
        "learning_rate": learner.scheduler.get_last_lr()[0],
        "images_per_second": images / max(time.perf_counter() - started, 1e-9),
        "seconds": state.elapsed(),
        "failed_images": len(state.failed),
    }
    return row, images


def _train_step(learner: Learner, views: list[torch.Tensor], step: int, config: EncoderTrainingConfig) -> float | None:
    """One optimizer step on a batch of views (``step`` counts from 1); returns its loss, or None when decode
    failures left fewer than the two images BatchNorm needs (the schedule then stays where it was)."""
    if not views or len(views[0]) < 2:
        return None
    inputs = [normalize(view, learner.preprocessing).to(learner.device, non_blocking=True) for view in views]
    with torch.autocast(learner.device.type, dtype=learner.amp_dtype, enabled=learner.amp_dtype is not None):
        loss = learner.module(inputs)
    if not torch.isfinite(loss):
        raise XselError(
            f"the {config.method} loss became {loss.item()} at step {step}; lower --learning-rate "
            f"(now {config.learning_rate:g}) or use --precision fp32"
        )
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    learner.scaler.unscale_(learner.optimizer)
    learner.module.before_step(step)
    torch.nn.utils.clip_grad_norm_(learner.trainable, config.grad_clip)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.module.after_step(step)
    learner.scheduler.step()
    return float(loss.detach())


def _outcome(run_dir: Path, config: EncoderTrainingConfig, data: TrainingData, state: RunState) -> EncoderTrainResult:
    """The call's summary: mean throughput over the trained epochs, the last loss and probe AUROC."""
    trained = [row for row in state.history if "loss" in row]
    return EncoderTrainResult(
        run_dir=run_dir,
        encoder_path=run_dir / ENCODER,
        epochs=state.step / data.steps_per_epoch,
        steps=state.step,
        seconds=state.elapsed(),
        stopped_by=state.stopped_by,
        images_per_second=float(np.mean([r["images_per_second"] for r in trained])) if trained else math.nan,
        final_loss=trained[-1]["loss"] if trained else math.nan,
        probe_auroc=state.history[-1].get("probe_auroc") if state.history else None,
        failed_images=len(state.failed),
        config=config,
    )


class _Probe:
    """Few-shot probe: embed a labelled store's images with the current backbone, then run ``evaluate``'s
    random-K episodes (K, cosine classifier by default) on them. Images are decoded once and kept in memory."""

    def __init__(self, store_path: Path, image_root: Path, config: EncoderTrainingConfig, preprocessing: dict):
        store = read_store(store_path)
        gray_preprocessing = {**preprocessing, "channels": 1, "mean": [0.0], "std": [1.0]}
        decoded = [decode_or_error(image_root / path, gray_preprocessing)[0] for path in store.paths]
        keep = [row for row, image in enumerate(decoded) if image is not None]
        if not keep:
            raise InputError(
                f"--probe-store {store_path}: none of its images could be read under {image_root}; "
                "pass --probe-image-root, the folder its Paths are relative to"
            )
        if len(keep) < len(store.paths):
            notify(f"probe: {len(store.paths) - len(keep)} of {len(store.paths)} images could not be read; left out")
        self.images = torch.from_numpy(np.stack([decoded[row] for row in keep])).half()
        self.preprocessing = preprocessing
        self.config = config
        self.meta = store.meta.iloc[keep].reset_index(drop=True)
        self.paths = [store.paths[i] for i in keep]
        self.store_path = store_path
        self.run(None, None)  # fails early (missing conditions, scarce classes) rather than after an epoch

    def run(self, backbone, device) -> dict[str, float]:
        """Mean query AUROC per probe condition and over all (``"probe_auroc"``); random features if no backbone."""
        if backbone is None:
            embeddings = np.random.default_rng(0).normal(size=(len(self.paths), 8)).astype(np.float32)
        else:
            was_training = backbone.training
            backbone.eval()
            chunks = []
            with torch.inference_mode():
                for batch in self.images.split(128):
                    inputs = normalize(batch.float(), self.preprocessing).to(device)
                    chunks.append(backbone(inputs).float().cpu().numpy())
            backbone.train(was_training)
            embeddings = np.concatenate(chunks)
        store = Store(path=self.store_path, embeddings=embeddings, paths=self.paths, meta=self.meta)
        result = evaluate(
            store,
            self.config.probe_conditions,
            selectors=["random"],
            k=[self.config.probe_k],
            episodes=self.config.probe_episodes,
            pool_size=PROBE_POOL_SIZE,
            query_size=PROBE_QUERY_SIZE,
            classifier=self.config.probe_classifier,
            negative=self.config.probe_negative,
            show_progress=False,
        )
        summary = result.summary.set_index("condition")["auroc"]
        scores = {f"probe_{condition}": float(summary[condition]) for condition in self.config.probe_conditions}
        return {"probe_auroc": float(summary["all"]), **scores}
