"""``xsel train classifier``: a multi-label chest X-ray classifier once the first images are labelled.

Two paths write the same run folder (``classifier.pt``, ``metrics.csv``, ``report.csv``, ``roc.png`` and
``errors.csv`` when rows were skipped):

* **fine-tuning** (default): an encoder plugin's network (DenseNet-121 as in CheXNet) plus the linear head of
  :mod:`xsel.classifier` on its pooled features, trained end to end — AdamW + OneCycle, gradient clipping,
  fp16 AMP on CUDA, light augmentation, optional class-balanced sampling. The fine-tuned backbone is saved
  as ``state_dict``, so ``xsel embed --encoder NAME --weights RUN/classifier.pt`` makes stores the head reads.
* **linear probe** (``store=``): only the head, fitted with :func:`xsel.classifier.fit_linear_head` on the
  embeddings of an existing store (rows matched by ``Path``): minutes on a CPU.

Both split labelled images by patient (never one ``PatientID`` on both sides), keep the epoch with the best mean
validation AUROC (the last one when no AUROC is defined), and choose per-label decision thresholds on validation.
Targets are (N, L) float arrays: 1 positive, 0 negative, NaN unknown (the uncertain policy already applied).

Pseudo-labels (``pseudo_labels``) come from the pool: rows without any known label (the CSV's own and
``--unlabeled``'s), minus rows whose Path is labelled or repeated and rows of validation patients. As in
FlexMatch (μ unlabelled per labelled sample), an epoch never lets them swamp the labels: see :func:`epoch_rows`.
An empty pool is an input error, not a silent run without pseudo-labels.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel.classifier import (
    CHECKPOINT_NAME,
    LOSSES,
    build_head,
    fit_linear_head,
    label_weights,
    multilabel_loss,
    save_classifier,
)
from xsel.errors import InputError
from xsel.io.table import PATH_COLUMN, check_unique_paths, read_csv_checked, read_image_table, write_csv_atomic
from xsel.labels import FINDING_LABELS, UNCERTAIN_POLICIES, available_conditions, condition_labels, patient_ids
from xsel.progress import notify, progress_bar

METRICS = "metrics.csv"
REPORT = "report.csv"
ROC_PLOT = "roc.png"
ERRORS = "errors.csv"
PSEUDO_FLOOR = 0.75  # lowest adaptive threshold on the predicted class's probability (0.5 would be a coin flip)
PSEUDO_RATIO = 1  # FlexMatch's μ: at most this many pseudo-labelled rows per labelled training row in an epoch
AUGMENT_DEGREES, AUGMENT_SCALE, AUGMENT_SHIFT, AUGMENT_INTENSITY = 5.0, 0.05, 0.04, 0.1
# Options that only fine-tuning reads, with their CLI names; with --store a non-default value is an input error.
FINE_TUNING_OPTIONS = {
    "encoder": "--encoder",
    "weights": "--weights",
    "image_size": "--image-size",
    "batch_size": "--batch-size",
    "augment": "--no-augment",
    "workers": "--workers",
    "balanced_sampler": "--balanced-sampler",
}


@dataclass
class ClassifierConfig:
    """Training settings, saved inside ``classifier.pt`` (``config``) for the record."""

    labels: list[str]
    encoder: str = "densenet121"
    weights: str | None = None
    store: str | None = None
    loss: str = "weighted-bce"
    uncertain: str = "positive"
    epochs: int = 10
    image_size: int | None = None
    batch_size: int = 16
    learning_rate: float | None = None  # None: 3e-4 when fine-tuning, 1e-2 for the linear probe
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    balanced_sampler: bool = False
    augment: bool = True
    max_grad_norm: float = 1.0
    probe_steps: int = 200
    pseudo_labels: bool = False
    unlabeled: str | None = None
    pseudo_threshold: float = 0.95
    warmup_epochs: int = 1
    workers: int = 0
    seed: int = 0

    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-2 if self.store else 3e-4


@dataclass
class ClassifierResult:
    """What a training run produced; ``report`` has one row per label (auroc, ap, f1, kappa, threshold, …)."""

    run_dir: Path
    checkpoint: Path
    best_epoch: int
    best_val_auroc: float
    report: pd.DataFrame
    train_images: int
    val_images: int
    skipped: int
    seconds: float
    device: str
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- labels, split, sampling, pseudo-labels


def label_matrix(frame: pd.DataFrame, labels: list[str], *, uncertain: str, source: str | Path) -> np.ndarray:
    """(N, L) float64 targets from CheXpert-style columns (1/0/-1/blank) or NIH ``Finding Labels``.

    A missing or all-empty column, a value other than 1/0/-1, or a label without any positive is an
    InputError naming the file, column (and row).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"--uncertain {uncertain}: choose one of {', '.join(UNCERTAIN_POLICIES)}")
    columns = []
    for label in labels:
        if label in frame.columns:
            raw = frame[label]
            values = pd.to_numeric(raw, errors="coerce")
            bad = (raw.notna() & ~values.isin([1, 0, -1])).to_numpy()
            if bad.any():
                row = int(bad.nonzero()[0][0])
                value = str(raw.iloc[row])
                raise InputError(
                    f"{source}: row {row + 2}, column {label!r} holds {value!r}; labels are 1, 0, -1 or blank"
                )
            if values.isna().all():
                raise InputError(f"{source}: column {label!r} is empty in every row; label some images first")
            array = values.to_numpy(dtype=np.float64, copy=True)
            array[array == -1] = {"positive": 1.0, "negative": 0.0, "ignore": np.nan}[uncertain]
        elif FINDING_LABELS in frame.columns and label in available_conditions(frame):
            array = condition_labels(frame, label, uncertain=uncertain)
        else:
            found = ", ".join(map(str, frame.columns[:12]))
            raise InputError(f"{source}: no label column {label!r} (columns: {found}); check --labels")
        if not (array == 1).any():
            raise InputError(f"{source}: label {label!r} has no positive image; a classifier cannot learn it")
        columns.append(array)
    return np.stack(columns, axis=1)


def split_by_patient(patients: list[str | None], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of training and validation images; every patient (or image without one) is on one side.

    Patients are ordered by a seeded CRC32 hash and the first ``round(fraction · patients)`` (at least one,
    never all) go to validation, so the split is reproducible and independent of row order.
    """
    if not 0 < fraction < 1:
        raise InputError(f"--val-fraction {fraction}: use a number between 0 and 1, e.g. 0.2")
    keys = [f"row:{i}" if patient is None else f"id:{patient}" for i, patient in enumerate(patients)]
    unique = sorted(set(keys), key=lambda key: (zlib.crc32(f"{seed}:{key}".encode()), key))
    if len(unique) < 2:
        raise InputError("all labelled images belong to one patient; a validation split needs at least two")
    held_out = set(unique[: min(max(1, round(fraction * len(unique))), len(unique) - 1)])
    val = np.asarray([i for i, key in enumerate(keys) if key in held_out], dtype=np.int64)
    train = np.asarray([i for i, key in enumerate(keys) if key not in held_out], dtype=np.int64)
    assert not {keys[i] for i in train} & {keys[i] for i in val}, "a patient is on both sides of the split"
    return train, val


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-image draw weights that balance positives and negatives of every label.

    An image's weight is the mean over its known labels of that class's weight from
    :func:`xsel.classifier.label_weights` (N/(2·N₊) or N/(2·N₋)); with one label, positives and negatives are
    then drawn equally often. Images without a known label get weight 1.
    """
    pos_weight, neg_weight = label_weights(targets)
    known = ~np.isnan(targets)
    per_entry = np.where(targets > 0.5, pos_weight, neg_weight) * known
    count = known.sum(axis=1)
    return np.where(count > 0, per_entry.sum(axis=1) / np.maximum(count, 1), 1.0)


def flexmatch_thresholds(probabilities: np.ndarray, tau: float, *, floor: float = PSEUDO_FLOOR) -> np.ndarray:
    """Per-label, per-class adaptive thresholds (L, 2) [negative, positive] from unlabeled predictions (U, L).

    FlexMatch (Zhang et al. 2021) adapted to binary labels. For label l and class k ∈ {negative, positive}, with
    q = max(p, 1 − p) the probability of the predicted class:
      σ_{l,k} = #{unlabeled images predicted k with q ≥ τ}           (the class's learning effect)
      β_{l,k} = σ_{l,k} / max(σ_{l,neg}, σ_{l,pos}, U − σ_{l,neg} − σ_{l,pos})   (normalised, with warm-up:
                 the still-unconfident images count as a competing class)
      T_{l,k} = floor + (τ − floor) · M(β_{l,k}),   M(x) = x / (2 − x)
    A class the model already predicts confidently and often keeps τ; a hard one gets a lower threshold, but
    never below ``floor`` (FlexMatch's lower end, 0, would accept coin flips in a binary problem).
    """
    if not 0.5 < tau < 1 or not 0.5 <= floor <= tau:
        raise InputError(f"--pseudo-threshold {tau}: use a probability between {floor} and 1, e.g. 0.95")
    p = np.asarray(probabilities, dtype=np.float64)
    confident_pos = (p >= tau).sum(axis=0)
    confident_neg = (1 - p >= tau).sum(axis=0)
    unused = len(p) - confident_pos - confident_neg
    denominator = np.maximum(np.maximum(confident_pos, confident_neg), np.maximum(unused, 1))
    beta = np.stack([confident_neg, confident_pos], axis=1) / denominator[:, None]
    return floor + (tau - floor) * beta / (2 - beta)


def pseudo_targets(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Hard pseudo-labels (U, L): 1 where p ≥ T_pos, 0 where 1 − p ≥ T_neg, NaN (ignored) otherwise."""
    p = np.asarray(probabilities, dtype=np.float64)
    targets = np.full(p.shape, np.nan)
    targets[1 - p >= thresholds[:, 0]] = 0.0
    targets[p >= thresholds[:, 1]] = 1.0
    return targets


def epoch_rows(
    labelled: np.ndarray, pseudo: np.ndarray, length: int, *, seed: int, epoch: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """One epoch's training rows, ``length`` of them in a seeded order.

    Every labelled row once, then up to ``length − len(labelled)`` pseudo-labelled rows drawn without replacement,
    and the rest filled with further labelled draws: with ``length = N_l + min(μ·N_l, pool)`` the labels make up
    at least 1/(1+μ) of every epoch however large the pool, and the epoch length (so the OneCycle schedule) does
    not change when pseudo-labels appear. With ``weights`` (balanced sampling) all labelled draws are weighted,
    with replacement.
    """
    rng = np.random.default_rng([seed, epoch])
    pseudo_part = rng.choice(pseudo, size=min(len(pseudo), max(0, length - len(labelled))), replace=False)
    count = length - len(pseudo_part)
    if weights is None:
        repeats = -(-count // len(labelled))
        labelled_part = np.concatenate([rng.permutation(labelled) for _ in range(repeats)])[:count]
    else:
        labelled_part = rng.choice(labelled, size=count, p=weights / weights.sum())
    return rng.permutation(np.concatenate([labelled_part, pseudo_part]).astype(np.int64))


def epoch_length(train: int, pool: int, pseudo_labels: bool) -> int:
    """Rows per epoch: the labelled training rows plus room for μ× as many pseudo-labelled ones (when used)."""
    return train + (min(PSEUDO_RATIO * train, pool) if pseudo_labels else 0)


# ---------------------------------------------------------------- metrics and report


def label_auroc(targets: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """AUROC per label over known targets; NaN for a label without both classes."""
    from sklearn.metrics import roc_auc_score

    result = []
    for column in range(targets.shape[1]):
        known = ~np.isnan(targets[:, column])
        y = targets[known, column]
        result.append(roc_auc_score(y, probabilities[known, column]) if 0 < y.sum() < len(y) else np.nan)
    return np.asarray(result, dtype=np.float64)


def best_epoch(mean_aurocs: list[float]) -> int:
    """Index of the epoch to keep: highest mean validation AUROC, the last epoch when none is defined."""
    values = np.asarray(mean_aurocs, dtype=np.float64)
    if np.isnan(values).all():
        return len(values) - 1
    return int(np.nanargmax(values))


def label_report(labels: list[str], targets: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """Per-label AUROC, AP, and F1 and Cohen's kappa at the validation threshold that maximises F1.

    The threshold is chosen on the same validation images it is scored on, so F1 and kappa are optimistic;
    AUROC and AP do not depend on it. A label without both classes gets NaN metrics and threshold 0.5.
    """
    from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, precision_recall_curve

    rows = []
    for column, label in enumerate(labels):
        known = ~np.isnan(targets[:, column])
        y, p = targets[known, column].astype(int), probabilities[known, column]
        row = {"label": label, "val_images": int(known.sum()), "val_positives": int(y.sum())}
        if 0 < y.sum() < len(y):
            precision, recall, cuts = precision_recall_curve(y, p)
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            threshold = float(cuts[int(np.argmax(f1))])
            predicted = (p >= threshold).astype(int)
            row |= {
                "auroc": float(label_auroc(y[:, None].astype(float), p[:, None])[0]),
                "ap": float(average_precision_score(y, p)),
                "f1": float(f1_score(y, predicted, zero_division=0.0)),
                "kappa": float(cohen_kappa_score(y, predicted)) if len(set(predicted)) > 1 else 0.0,
                "threshold": threshold,
            }
        else:
            row |= {"auroc": np.nan, "ap": np.nan, "f1": np.nan, "kappa": np.nan, "threshold": 0.5}
        rows.append(row)
    return pd.DataFrame(
        rows, columns=["label", "auroc", "ap", "f1", "kappa", "threshold", "val_images", "val_positives"]
    )


def plot_roc(labels: list[str], targets: np.ndarray, probabilities: np.ndarray, path: Path) -> Path:
    """Validation ROC curve per label (labels without both classes are left out), written atomically."""
    from sklearn.metrics import roc_curve

    from xsel import plots

    figure, axes = plots.plt.subplots(figsize=(5.2, 5))
    for column, label in enumerate(labels):
        known = ~np.isnan(targets[:, column])
        y, p = targets[known, column], probabilities[known, column]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, p)
            axes.plot(fpr, tpr, label=f"{label} (AUROC {label_auroc(y[:, None], p[:, None])[0]:.3f})")
    axes.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("Validation ROC")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # no curve when no label has both classes in validation
        axes.legend(fontsize=8, loc="lower right")
    return plots.save_figure(figure, path)


# ---------------------------------------------------------------- data


@dataclass
class _Data:
    """The rows a run works on. ``targets`` (N, L) covers every row; unlabeled rows are all-NaN."""

    paths: list[str]
    files: list[Path] | None  # image files (fine-tuning) or None (store path)
    embeddings: np.ndarray | None  # (N, D) store rows (store path) or None
    targets: np.ndarray
    train: np.ndarray
    val: np.ndarray
    pool: np.ndarray  # unlabeled rows that may receive pseudo-labels
    errors: list[tuple[str, str]]
    identity: dict | None  # the store's encoder identity (store path)


def _read_rows(config: ClassifierConfig, csv: Path, image_root) -> tuple[list[str], list[Path], pd.DataFrame]:
    if config.store:
        frame = read_csv_checked(csv)
        paths = frame[PATH_COLUMN].astype(str)
        check_unique_paths(paths, csv)
        return paths.tolist(), [Path(p) for p in paths], frame
    table = read_image_table(csv, image_root)
    return table.paths, table.files, table.frame


def _prepare(config: ClassifierConfig, csv: Path, image_root) -> tuple[_Data, list[str]]:
    """Read the CSV(s), apply the label policy, match the store, split by patient; log the split."""
    paths, files, frame = _read_rows(config, csv, image_root)
    targets = label_matrix(frame, config.labels, uncertain=config.uncertain, source=csv)
    patients = patient_ids(frame)
    patients = [None] * len(frame) if patients is None else list(patients)
    if config.unlabeled:
        extra_paths, extra_files, extra = _read_rows(config, Path(config.unlabeled), image_root)
        extra_patients = patient_ids(extra)
        paths += extra_paths
        files += extra_files
        patients += [None] * len(extra) if extra_patients is None else list(extra_patients)
        targets = np.concatenate([targets, np.full((len(extra), len(config.labels)), np.nan)])
    errors: list[tuple[str, str]] = []
    embeddings = None
    keep = np.ones(len(paths), dtype=bool)
    if config.store:
        from xsel.store import read_store

        store = read_store(config.store)
        index = {path: row for row, path in enumerate(store.paths)}
        where = np.asarray([index.get(path, -1) for path in paths])
        keep = where >= 0
        if not keep.any():
            raise InputError(
                f"{csv}: none of its {len(paths)} Path values is in {config.store}; "
                f"embed this CSV into the store first (xsel embed {csv} --out {config.store})"
            )
        errors = [(paths[i], f"not in {Path(config.store).name}") for i in np.flatnonzero(~keep)]
        embeddings = np.zeros((len(paths), store.embeddings.shape[1]), dtype=np.float32)
        embeddings[keep] = store.embeddings[where[keep]]
        identity = store.encoder_identity
    else:
        identity = None
    labelled = np.flatnonzero(keep & ~np.isnan(targets).all(axis=1))
    if len(labelled) == 0:
        raise InputError(f"{csv}: no row has a known value for {', '.join(config.labels)}")
    train_pos, val_pos = split_by_patient([patients[i] for i in labelled], config.val_fraction, config.seed)
    train, val = labelled[train_pos], labelled[val_pos]
    val_patients = {patients[i] for i in val if patients[i] is not None}
    seen = {paths[i] for i in labelled}  # a labelled image (validation above all) never returns as pseudo-labelled
    pool = []
    for i in np.flatnonzero(keep & np.isnan(targets).all(axis=1)):
        if paths[i] not in seen and (patients[i] is None or patients[i] not in val_patients):
            pool.append(i)
        seen.add(paths[i])
    pool = np.asarray(pool, dtype=np.int64)
    if config.pseudo_labels and len(pool) == 0:
        raise InputError(
            f"--pseudo-labels: no unlabelled row to pseudo-label (rows without a known {', '.join(config.labels)}, "
            "not already labelled, not of a validation patient"
            + (", and in the store" if config.store else "")
            + "); add --unlabeled CSV or leave out --pseudo-labels"
        )
    who = "patients" if any(p is not None for p in patients) else "images (no PatientID column)"
    notify(
        f"patient-level split: {len(train)} training and {len(val)} validation images, "
        f"{len({patients[i] or i for i in train})} and {len({patients[i] or i for i in val})} {who}; "
        "no PatientID in both",
        label="split",
        style="cyan",
    )
    warnings = []
    for column, label in enumerate(config.labels):
        y = targets[val, column]
        y = y[~np.isnan(y)]
        if not 0 < y.sum() < len(y):
            missing = "positive" if y.sum() == 0 else "negative"
            warnings.append(
                f"label {label!r} has no {missing} image among the {len(val)} validation images: its AUROC is NaN "
                "(label more images or raise --val-fraction)"
            )
            notify(warnings[-1])
    data = _Data(paths, None if config.store else files, embeddings, targets, train, val, pool, errors, identity)
    return data, warnings


# ---------------------------------------------------------------- the run


def train_classifier(
    csv: str | Path,
    run_dir: str | Path,
    config: ClassifierConfig,
    *,
    image_root: str | Path | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ClassifierResult:
    """Train a classifier on the labelled rows of ``csv`` (fine-tuning, or a linear probe when ``config.store``).

    Writes ``classifier.pt`` (best epoch), ``metrics.csv`` (one row per epoch), ``report.csv``, ``roc.png`` and,
    when rows were skipped (undecodable images, paths missing from the store), ``errors.csv``.
    """
    csv, run_dir = Path(csv), Path(run_dir)
    _check(config)
    if config.store and (device != "auto" or image_root is not None):
        option = "--device" if device != "auto" else "--image-root"
        raise InputError(f"{option} applies to fine-tuning; the --store probe reads the store's embeddings")
    if (run_dir / CHECKPOINT_NAME).exists() and not overwrite:
        raise InputError(f"{run_dir / CHECKPOINT_NAME} already exists; pass --overwrite or choose another --out")
    started = time.perf_counter()
    data, warnings = _prepare(config, csv, image_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.store:
        outcome = _fit_probe(config, data, run_dir)
        device_name = "cpu"
    else:
        outcome = _fine_tune(config, data, run_dir, device, show_progress)
        device_name = outcome["device"]
    val_probabilities = outcome["val_probabilities"]
    val_ok = outcome["val_rows"]
    report = label_report(config.labels, data.targets[val_ok], val_probabilities)
    write_csv_atomic(report, run_dir / REPORT)
    plot_roc(config.labels, data.targets[val_ok], val_probabilities, run_dir / ROC_PLOT)
    checkpoint = save_classifier(
        run_dir / CHECKPOINT_NAME,
        head=outcome["head"],
        labels=config.labels,
        encoder_identity=outcome["identity"],
        thresholds=report["threshold"].tolist(),
        config={**asdict(config), "best_epoch": outcome["best_epoch"] + 1},
        backbone_state=outcome.get("backbone_state"),
    )
    errors = data.errors + outcome.get("errors", [])
    if errors:
        write_csv_atomic(pd.DataFrame(errors, columns=[PATH_COLUMN, "error"]), run_dir / ERRORS)
    else:
        (run_dir / ERRORS).unlink(missing_ok=True)
    return ClassifierResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        best_epoch=outcome["best_epoch"] + 1,
        best_val_auroc=outcome["best_auroc"],
        report=report,
        train_images=len(data.train),
        val_images=len(data.val),
        skipped=len(errors),
        seconds=time.perf_counter() - started,
        device=device_name,
        warnings=warnings,
    )


def _check(config: ClassifierConfig) -> None:
    if not config.labels:
        raise InputError("--labels is empty; name the label columns to learn, e.g. --labels Effusion,Edema")
    if len(set(config.labels)) != len(config.labels):
        raise InputError(f"--labels {','.join(config.labels)} repeats a label")
    if config.loss not in LOSSES:
        raise InputError(f"--loss {config.loss}: choose one of {', '.join(LOSSES)}")
    for name, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size)):
        if value < 1:
            raise InputError(f"{name} {value}: use at least 1")
    if config.lr() <= 0 or config.seed < 0 or config.workers < 0:
        raise InputError("--learning-rate must be positive, --seed and --workers 0 or more")
    if config.store:
        defaults = ClassifierConfig(labels=config.labels)
        for name, option in FINE_TUNING_OPTIONS.items():
            if getattr(config, name) != getattr(defaults, name):
                raise InputError(f"{option} applies to fine-tuning; the --store probe reads the store's embeddings")
    if config.pseudo_labels:
        flexmatch_thresholds(np.zeros((0, 1)), config.pseudo_threshold)  # validates τ
    elif config.unlabeled:
        raise InputError("--unlabeled feeds --pseudo-labels; add --pseudo-labels or leave it out")


def _metrics_row(epoch, loss, aurocs, labels, pseudo, lr, started) -> dict:
    mean = float(np.nanmean(aurocs)) if not np.isnan(aurocs).all() else float("nan")
    row = {"epoch": epoch + 1, "train_loss": loss, "val_auroc": mean}
    row |= {f"val_auroc_{label}": float(value) for label, value in zip(labels, aurocs, strict=True)}
    row["pseudo_labeled"] = 0 if pseudo is None else int((~np.isnan(pseudo)).any(axis=1).sum())
    row |= {
        f"pseudo_{label}": 0 if pseudo is None else int((~np.isnan(pseudo[:, c])).sum())
        for c, label in enumerate(labels)
    }
    return row | {"learning_rate": lr, "seconds": round(time.perf_counter() - started, 2)}


def _pseudo(config: ClassifierConfig, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-targets of the pool and the mask of pool rows that received at least one hard label."""
    targets = pseudo_targets(probabilities, flexmatch_thresholds(probabilities, config.pseudo_threshold))
    return targets, ~np.isnan(targets).all(axis=1)


def _fit_probe(config: ClassifierConfig, data: _Data, run_dir: Path) -> dict:
    """Linear probe: one fit per epoch when pseudo-labelling, else one.

    Each refit is full-batch on the labelled rows plus at most μ× as many pseudo-labelled rows (a seeded draw,
    :func:`epoch_rows`), so the pool cannot outweigh the labels.
    """
    import torch

    x, y = data.embeddings, data.targets.copy()  # pool rows receive pseudo-labels in y
    rounds = config.epochs if config.pseudo_labels else 1
    started, metrics, states, aurocs = time.perf_counter(), [], [], []
    pseudo = None
    for epoch in range(rounds):
        rows = data.train
        if pseudo is not None:
            targets_pool, chosen = pseudo
            y[data.pool] = targets_pool
            length = len(data.train) + min(PSEUDO_RATIO * len(data.train), int(chosen.sum()))
            rows = epoch_rows(data.train, data.pool[chosen], length, seed=config.seed, epoch=epoch)
        targets = y[rows]
        head = fit_linear_head(
            x[rows],
            targets,
            loss=config.loss,
            epochs=config.probe_steps,
            learning_rate=config.lr(),
            weight_decay=config.weight_decay,
            seed=config.seed,
        )
        with torch.inference_mode():
            logits = head(torch.from_numpy(x[rows]))
            pos_weight, neg_weight = (torch.as_tensor(w) for w in label_weights(targets))
            loss = float(
                multilabel_loss(
                    logits,
                    torch.as_tensor(targets, dtype=torch.float32),
                    loss=config.loss,
                    pos_weight=pos_weight,
                    neg_weight=neg_weight,
                )
            )
            val_p = torch.sigmoid(head(torch.from_numpy(x[data.val])).double()).numpy()
            pool_p = (
                torch.sigmoid(head(torch.from_numpy(x[data.pool])).double()).numpy() if config.pseudo_labels else None
            )
        aurocs.append(label_auroc(y[data.val], val_p))
        states.append((head, val_p))
        metrics.append(
            _metrics_row(
                epoch,
                loss,
                aurocs[-1],
                config.labels,
                None if pseudo is None else np.where(pseudo[1][:, None], pseudo[0], np.nan),
                config.lr(),
                started,
            )
        )
        write_csv_atomic(pd.DataFrame(metrics), run_dir / METRICS)
        if pool_p is not None and epoch + 1 >= config.warmup_epochs:
            pseudo = _pseudo(config, pool_p)
    best = best_epoch([row["val_auroc"] for row in metrics])
    head, val_p = states[best]
    return {
        "head": head,
        "identity": data.identity,
        "val_probabilities": val_p,
        "val_rows": data.val,
        "best_epoch": best,
        "best_auroc": metrics[best]["val_auroc"],
    }


class _Images:
    """Decoded, preprocessed images for a DataLoader; a failure travels as a message, not an exception."""

    def __init__(self, files: list[Path], rows: np.ndarray, preprocessing: dict):
        self.files, self.rows, self.preprocessing = files, rows, preprocessing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        from xsel.io.images import ImageDecodeError, load_image

        row = int(self.rows[position])
        try:
            return row, load_image(self.files[row], self.preprocessing), None
        except ImageDecodeError as error:
            return row, None, str(error)


def augment_seed(seed: int, epoch: int, row: int) -> int:
    """The augmentation seed of one row in one epoch: independent of batching, decode workers and prefetching."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])


def augment(images, seeds: list[int]):
    """Light augmentation, one seed per image: rotation ±5°, scale ±5%, shift ±4%, contrast and brightness ±10%.

    No horizontal flips: the heart's side is anatomy, not noise.
    """
    import torch
    import torch.nn.functional as F

    uniform = torch.stack([torch.rand(6, generator=torch.Generator().manual_seed(seed)) for seed in seeds]) * 2 - 1
    angle = uniform[:, 0] * math.radians(AUGMENT_DEGREES)
    scale = 1 + uniform[:, 1] * AUGMENT_SCALE
    shift = uniform[:, 2:4] * AUGMENT_SHIFT * 2  # grid coordinates span 2
    theta = torch.stack(
        [
            torch.stack([angle.cos() / scale, -angle.sin() / scale, shift[:, 0]], dim=1),
            torch.stack([angle.sin() / scale, angle.cos() / scale, shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    contrast = (1 + uniform[:, 4, None, None, None] * AUGMENT_INTENSITY).to(images.device, images.dtype)
    brightness = (uniform[:, 5, None, None, None] * AUGMENT_INTENSITY).to(images.device, images.dtype)
    return moved * contrast + brightness


def _loader(data: _Data, rows: np.ndarray, preprocessing: dict, config: ClassifierConfig):
    """Batches of ``rows`` in the given order (the order itself is seeded by :func:`epoch_rows`)."""
    from torch.utils.data import DataLoader

    from xsel.embed import collate_decoded  # drops failed images from the batch, keeps their messages

    return DataLoader(
        _Images(data.files, rows, preprocessing),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=collate_decoded,
    )


def predict(backbone, head, loader, device, amp_dtype, failed: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows that decoded and their probabilities (n, L) in eval mode; failures are added to ``failed``."""
    import torch

    backbone.eval()
    head.eval()
    rows, outputs = [], []
    with torch.inference_mode():
        for batch_rows, batch, errors in loader:
            failed.update(errors)
            if batch is None:
                continue
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = head(backbone(batch.to(device)))
            rows.append(batch_rows)
            outputs.append(torch.sigmoid(logits.double()).cpu().numpy())
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, head.linear.out_features))
    return np.concatenate(rows), np.concatenate(outputs)


def _fine_tune(config: ClassifierConfig, data: _Data, run_dir: Path, device: str, show_progress: bool) -> dict:
    """End-to-end training of backbone + head; returns the best epoch's state and validation predictions."""
    import torch

    from xsel import plugins
    from xsel.encoders import create_encoder, weights_sha256
    from xsel.runtime import autocast_dtype, resolve_device

    torch_device = resolve_device(device)
    amp_dtype = autocast_dtype("auto", torch_device)
    backbone = create_encoder(config.encoder, config.weights, image_size=config.image_size)
    preprocessing = backbone.preprocessing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = build_head(int(backbone.embedding_dim), len(config.labels))
    backbone.to(torch_device)
    head.to(torch_device)
    parameters = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr(), weight_decay=config.weight_decay)
    length = epoch_length(len(data.train), len(data.pool), config.pseudo_labels)
    steps_per_epoch = math.ceil(length / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr(), total_steps=config.epochs * steps_per_epoch
    )
    scaler = torch.amp.GradScaler(torch_device.type, enabled=amp_dtype == torch.float16)
    failed: dict[int, str] = {}
    targets = data.targets.copy()  # pool rows receive pseudo-labels here
    pseudo_rows = np.zeros(0, dtype=np.int64)
    started, metrics, best_state, best_auroc, best_val = time.perf_counter(), [], None, -np.inf, None
    last_val = None
    total = config.epochs * length
    pos_weight, neg_weight = (torch.as_tensor(w).to(torch_device) for w in label_weights(targets[data.train]))
    with progress_bar("Fine-tuning", total=total, show=show_progress) as advance:
        for epoch in range(config.epochs):
            labelled = np.asarray([r for r in data.train if r not in failed], dtype=np.int64)
            weights = sample_weights(targets[labelled]) if config.balanced_sampler else None
            order = epoch_rows(labelled, pseudo_rows, length, seed=config.seed, epoch=epoch, weights=weights)
            backbone.train()
            head.train()
            losses = []
            for rows, batch, errors in _loader(data, order, preprocessing, config):
                failed.update(errors)
                advance(len(rows) + len(errors))
                if batch is None or len(rows) < 2:  # batch norm needs two images
                    continue
                images = batch.to(torch_device)
                if config.augment:
                    images = augment(images, [augment_seed(config.seed, epoch, int(row)) for row in rows])
                y = torch.from_numpy(targets[rows]).float().to(torch_device)
                with torch.autocast(torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = head(backbone(images))
                loss = multilabel_loss(logits, y, loss=config.loss, pos_weight=pos_weight, neg_weight=neg_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                losses.append(float(loss.detach()))
            if not losses:
                raise InputError(
                    f"no training image could be decoded (first: {data.paths[next(iter(failed))]}: "
                    f"{next(iter(failed.values()))})"
                    if failed
                    else "no training batch held two images; add images"
                )
            val_ok, val_p = predict(
                backbone, head, _loader(data, data.val, preprocessing, config), torch_device, amp_dtype, failed
            )
            aurocs = label_auroc(targets[val_ok], val_p) if len(val_ok) else np.full(len(config.labels), np.nan)
            pseudo_now = targets[pseudo_rows] if len(pseudo_rows) else None
            metrics.append(
                _metrics_row(
                    epoch, float(np.mean(losses)), aurocs, config.labels, pseudo_now, schedule.get_last_lr()[0], started
                )
            )
            write_csv_atomic(pd.DataFrame(metrics), run_dir / METRICS)
            mean = metrics[-1]["val_auroc"]
            last_val = (val_ok, val_p)
            if best_state is None or mean > best_auroc or (np.isnan(best_auroc) and not np.isnan(mean)):
                best_auroc, best_epoch_index, best_val = mean, epoch, (val_ok, val_p)
                best_state = _snapshot(backbone), _snapshot(head)
            if config.pseudo_labels and epoch + 1 >= config.warmup_epochs:
                pool = np.asarray([r for r in data.pool if r not in failed], dtype=np.int64)
                pool_ok, pool_p = predict(
                    backbone, head, _loader(data, pool, preprocessing, config), torch_device, amp_dtype, failed
                )
                pool_targets, chosen = _pseudo(config, pool_p)
                targets[data.pool] = np.nan
                targets[pool_ok] = pool_targets
                pseudo_rows = pool_ok[chosen]
    if np.isnan([row["val_auroc"] for row in metrics]).all():  # nothing to choose by: keep the last epoch
        best_epoch_index, best_state, best_val = len(metrics) - 1, (_snapshot(backbone), _snapshot(head)), last_val
    backbone.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    backbone.cpu()
    head.cpu()
    identity = {
        "encoder": plugins.get("encoder", config.encoder).name,
        "weights_sha256": weights_sha256(backbone),
        "preprocessing": preprocessing,
    }
    errors = [(data.paths[row], message) for row, message in sorted(failed.items())]
    return {
        "head": head.eval(),
        "identity": identity,
        "backbone_state": backbone.state_dict(),
        "val_probabilities": best_val[1],
        "val_rows": best_val[0],
        "best_epoch": best_epoch_index,
        "best_auroc": metrics[best_epoch_index]["val_auroc"],
        "errors": errors,
        "device": str(torch_device),
    }


def _snapshot(module) -> dict:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
