"""``xsel train encoder`` as a library call: unlabeled images → a self-supervised domain encoder.

The run folder holds ``encoder.pt`` (the backbone's state dict plus an ``xsel`` record of method,
architecture and preprocessing, read by ``xsel embed`` / ``xsel export``), ``last.pt`` (everything needed
to resume: module, optimizer, schedule, position in the epoch) and ``metrics.csv`` (one row per epoch, with
the few-shot probe AUROC when a probe store is given; row 0 is the untrained starting point).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel.checkpoints import read_checkpoint
from xsel.encoders import create_encoder
from xsel.errors import InputError, XselError
from xsel.io.atomic import save_torch_atomic
from xsel.io.images import ImageDecodeError, preprocess, read_image
from xsel.io.table import PATH_COLUMN, read_image_table, write_csv_atomic
from xsel.progress import notify, progress_bar
from xsel.ssl import METHODS, augment, build_method, normalize, view_crops
from xsel.store import Store, read_store

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
    """Everything that defines a run; saved in ``last.pt`` and ``encoder.pt`` and checked on ``--resume``."""

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
    temperature: float | None = None  # None: the method's default (see xsel.ssl.TEMPERATURES)
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


class _ViewDataset:
    """Decodes an image and draws its views in DataLoader workers; a failure travels as a message."""

    def __init__(self, files: list[Path], crops, seed: int, image_size: int):
        self.files, self.crops, self.seed = files, crops, seed
        self.max_side = 2 * image_size  # shrink big radiographs once, before rotating and cropping

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        import torch
        import torchvision.transforms.v2.functional as F

        epoch, index = item
        try:
            gray = torch.from_numpy(read_image(self.files[index]))[None]
        except ImageDecodeError as error:
            return index, str(error)
        if max(gray.shape[-2:]) > self.max_side:
            scale = self.max_side / max(gray.shape[-2:])
            size = [max(2, round(gray.shape[-2] * scale)), max(2, round(gray.shape[-1] * scale))]
            gray = F.resize(gray, size, antialias=True)
        rng = np.random.default_rng([self.seed, epoch, index])
        return index, [augment(gray, crop, rng) for crop in self.crops]


def _collate_views(items):
    """Stack the decoded items view by view; failures come back as (index, message) pairs."""
    import torch

    good = [views for _, views in items if not isinstance(views, str)]
    failed = [(index, views) for index, views in items if isinstance(views, str)]
    stacked = [torch.stack([views[v] for views in good]) for v in range(len(good[0]))] if good else []
    return stacked, failed


def epoch_order(n: int, epoch: int, config: EncoderTrainingConfig, weights: np.ndarray | None) -> list[int]:
    """The images of one epoch, in order: a seeded permutation, or a ``WeightedRandomSampler`` draw."""
    import torch

    generator = torch.Generator().manual_seed(int(np.random.default_rng([config.seed, epoch]).integers(2**62)))
    if weights is None:
        return torch.randperm(n, generator=generator).tolist()
    sampler = torch.utils.data.WeightedRandomSampler(weights.tolist(), n, replacement=True, generator=generator)
    return list(sampler)


def balance_weights(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Inverse-frequency weights of a column's values (blank is a value too): each value is drawn equally."""
    if column not in frame.columns:
        raise InputError(f"--balance-by {column!r}: no such column; columns: {', '.join(map(str, frame.columns))}")
    values = frame[column].astype(str).where(frame[column].notna(), "")
    counts = values.map(values.value_counts())
    return (1.0 / counts.to_numpy(dtype=np.float64)).astype(np.float64)


class _Probe:
    """Few-shot probe: embed a labelled store's images with the current backbone, then run ``evaluate``'s
    random-K episodes (K, cosine classifier by default) on them. Images are decoded once and kept in memory."""

    def __init__(self, store_path: Path, image_root: Path, config: EncoderTrainingConfig, preprocessing: dict):
        import torch

        store = read_store(store_path)
        gray_preprocessing = {**preprocessing, "channels": 1, "mean": [0.0], "std": [1.0]}
        images, keep = [], []
        for row, path in enumerate(store.paths):
            try:
                images.append(preprocess(read_image(image_root / path), gray_preprocessing))
                keep.append(row)
            except ImageDecodeError:
                continue
        if not keep:
            raise InputError(
                f"--probe-store {store_path}: none of its images could be read under {image_root}; "
                "pass --probe-image-root, the folder its Paths are relative to"
            )
        if len(keep) < len(store.paths):
            notify(f"probe: {len(store.paths) - len(keep)} of {len(store.paths)} images could not be read; left out")
        self.images = torch.from_numpy(np.stack(images)).half()
        self.preprocessing = preprocessing
        self.config = config
        self.meta = store.meta.iloc[keep].reset_index(drop=True)
        self.paths = [store.paths[i] for i in keep]
        self.store_path = store_path
        self.run(None, None)  # fails early (missing conditions, scarce classes) rather than after an epoch

    def run(self, backbone, device) -> dict[str, float]:
        """Mean query AUROC per probe condition and over all (``"probe_auroc"``); random features if no backbone."""
        import torch

        from xsel.evaluate import evaluate

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


def queue_length(config: EncoderTrainingConfig, n_images: int) -> int:
    """MoCo's queue: ``queue_size`` if set, else 4096 capped at half the images (whole batches), so the queue
    never holds a stale key of the very image being contrasted."""
    if config.queue_size is not None:
        return config.queue_size
    return max(config.batch_size, min(4096, (n_images // 2) // config.batch_size * config.batch_size))


def _check_config(config: EncoderTrainingConfig, probe_store) -> None:
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


def load_run_state(path: Path) -> dict:
    """Read ``last.pt`` safely; a foreign or damaged file is a one-line InputError."""
    return read_checkpoint(path, file_format=RUN_FORMAT, kind="encoder training", made_by="xsel train encoder")[1]


def train_encoder(
    csv: str | Path,
    run_dir: str | Path,
    config: EncoderTrainingConfig,
    *,
    image_root: str | Path | None = None,
    probe_store: str | Path | None = None,
    probe_image_root: str | Path | None = None,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> EncoderTrainResult:
    """Pretrain ``config.arch`` on the images of ``csv`` with ``config.method``; files in ``run_dir``.

    ``probe_store``'s Paths are resolved against ``probe_image_root`` (default: the CSV's folder, right
    when the probe store was embedded from the same CSV).
    """
    import torch

    from xsel.runtime import autocast_dtype, resolve_device

    _check_config(config, probe_store)
    run_dir = Path(run_dir)
    if not resume and any((run_dir / name).exists() for name in (LAST, ENCODER, METRICS)):
        raise InputError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    table = read_image_table(csv, image_root)
    files = table.files
    weights = balance_weights(table.frame, config.balance_by) if config.balance_by else None
    steps_per_epoch = len(files) // config.batch_size
    if steps_per_epoch == 0:
        raise InputError(
            f"{csv}: {len(files)} images is fewer than one batch (--batch-size {config.batch_size}); "
            "lower --batch-size or add images"
        )
    total_steps = steps_per_epoch * config.epochs
    torch_device = resolve_device(device)
    amp_dtype = autocast_dtype(config.precision, torch_device)

    backbone = create_encoder(config.arch, weights=config.weights, image_size=config.image_size)
    if not any(p.requires_grad for p in backbone.parameters()):
        raise InputError(f"--arch {config.arch}: this encoder has no trainable weights; choose a CNN like resnet18")
    preprocessing = dict(backbone.preprocessing)
    probe = None
    if probe_store is not None:
        root = Path(probe_image_root or image_root or Path(csv).resolve().parent)
        probe = _Probe(Path(probe_store), root, config, preprocessing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        module = build_method(
            config.method,
            backbone,
            projection_dim=config.projection_dim,
            temperature=config.temperature,
            queue_size=queue_length(config, len(files)),
            momentum=config.momentum,
            prototypes=config.prototypes,
            total_steps=total_steps,
            freeze_prototype_steps=steps_per_epoch,
        )
    module.to(torch_device)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=total_steps, pct_start=config.warmup_fraction
    )
    scaler = torch.amp.GradScaler(torch_device.type, enabled=amp_dtype == torch.float16)

    step, elapsed, history, failed = 0, 0.0, [], {}
    # what a resumed run must share beyond the config: the images (they set the schedule) and the arithmetic
    images_sha256 = hashlib.sha256("\n".join(map(str, table.paths)).encode()).hexdigest()
    arithmetic = str(amp_dtype or "fp32")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / LAST).exists():
        state = load_run_state(run_dir / LAST)
        saved = {key: value for key, value in state["config"].items() if key not in RESUMABLE}
        changed = sorted(key for key, value in saved.items() if getattr(config, key, None) != value)
        if changed:
            raise InputError(
                f"{run_dir / LAST} was trained with other settings ({', '.join(changed)}); resume with the same "
                f"settings (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change) "
                "or start a new --out"
            )
        if state["images_sha256"] != images_sha256:
            raise InputError(
                f"{run_dir / LAST} was trained on another image list ({state['n_images']} images, now {len(files)}); "
                "resume with the same CSV or start a new --out"
            )
        if state["arithmetic"] != arithmetic:
            raise InputError(
                f"{run_dir / LAST} was trained in {state['arithmetic']} on {state['device']}, this run would use "
                f"{arithmetic} on {torch_device.type}; resume with the same --device and --precision"
            )
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, elapsed, history = state["step"], state["seconds"], state["history"]
        failed = dict(state["failed"])
    elif probe is not None:
        history.append({"epoch": 0, "step": 0, **probe.run(backbone, torch_device)})

    dataset = _ViewDataset(
        files, view_crops(config.method, config.image_size, config.small_crops), config.seed, config.image_size
    )
    workers = config.workers if config.workers is not None else max(1, min(4, (os.cpu_count() or 2) // 2))
    started = time.perf_counter()  # --max-minutes budgets this invocation; `elapsed` carries the run's total
    stopped_by, losses = "epochs", []

    def checkpoint() -> None:
        epochs_done = step / steps_per_epoch
        save_torch_atomic(_encoder_payload(backbone, config, preprocessing, step, epochs_done), run_dir / ENCODER)
        save_torch_atomic(
            {
                "format": RUN_FORMAT,
                "module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "config": asdict(config),
                "images_sha256": images_sha256,
                "n_images": len(files),
                "arithmetic": arithmetic,
                "device": torch_device.type,
                "step": step,
                "seconds": elapsed + time.perf_counter() - started,
                "history": history,
                "failed": sorted(failed.items()),
            },
            run_dir / LAST,
        )
        write_csv_atomic(pd.DataFrame(history), run_dir / METRICS)

    module.train()
    with progress_bar("Pretraining", total=total_steps, unit="steps", show=show_progress) as advance:
        advance(step)
        while step < total_steps and stopped_by == "epochs":
            epoch, position = divmod(step, steps_per_epoch)
            order = epoch_order(len(files), epoch, config, weights)[: steps_per_epoch * config.batch_size]
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=[(epoch, index) for index in order[position * config.batch_size :]],
                num_workers=workers,
                collate_fn=_collate_views,
                pin_memory=torch_device.type == "cuda",
                persistent_workers=False,
            )
            epoch_started, epoch_images, epoch_losses = time.perf_counter(), 0, []
            for views, failures in loader:
                for index, message in failures:
                    failed[int(index)] = message
                step += 1
                if len(views) and len(views[0]) >= 2:  # BatchNorm needs two images
                    inputs = [normalize(v, preprocessing).to(torch_device, non_blocking=True) for v in views]
                    with torch.autocast(torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = module(inputs)
                    if not torch.isfinite(loss):
                        raise XselError(
                            f"the {config.method} loss became {loss.item()} at step {step}; lower --learning-rate "
                            f"(now {config.learning_rate:g}) or use --precision fp32"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    module.before_step(step)
                    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    module.after_step(step)
                    losses.append(float(loss.detach()))
                    epoch_losses.append(losses[-1])
                    epoch_images += len(views[0])
                    scheduler.step()  # a batch lost to decode failures leaves the schedule where it was
                rate = epoch_images / max(time.perf_counter() - epoch_started, 1e-9)
                advance(1, status=f"loss {np.mean(losses[-20:]):.3f} · {rate:.0f} img/s" if losses else "")
                if config.max_minutes is not None and time.perf_counter() - started > config.max_minutes * 60:
                    stopped_by = "time budget"
                    break
            row = {
                "epoch": round(step / steps_per_epoch, 4),
                "step": step,
                "loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
                "learning_rate": scheduler.get_last_lr()[0],
                "images_per_second": epoch_images / max(time.perf_counter() - epoch_started, 1e-9),
                "seconds": elapsed + time.perf_counter() - started,
                "failed_images": len(failed),
            }
            if probe is not None:
                row.update(probe.run(backbone, torch_device))
            history.append(row)
            if failed:
                errors = pd.DataFrame(
                    {
                        PATH_COLUMN: [table.paths[i] for i in sorted(failed)],
                        "error": [failed[i] for i in sorted(failed)],
                    }
                )
                write_csv_atomic(errors, run_dir / ERRORS)
            if epoch_images == 0 and stopped_by == "epochs":
                example = next(iter(failed.values()), "batches too small")
                raise InputError(
                    f"{csv}: no image of this epoch could be used ({len(failed)} failed to decode, e.g. {example}); "
                    f"see {run_dir / ERRORS} and check the paths or --image-root"
                )
            checkpoint()
    if failed:
        notify(f"{len(failed)} images could not be decoded and were skipped; see {run_dir / ERRORS}")
    seconds = elapsed + time.perf_counter() - started
    trained = [r for r in history if "loss" in r]
    return EncoderTrainResult(
        run_dir=run_dir,
        encoder_path=run_dir / ENCODER,
        epochs=step / steps_per_epoch,
        steps=step,
        seconds=seconds,
        stopped_by=stopped_by,
        images_per_second=float(np.mean([r["images_per_second"] for r in trained])) if trained else math.nan,
        final_loss=trained[-1]["loss"] if trained else math.nan,
        probe_auroc=history[-1].get("probe_auroc") if history else None,
        failed_images=len(failed),
    )
