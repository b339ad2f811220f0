"""``xsel train classifier``: a multi-label chest X-ray classifier once the first images are labelled.

Two paths write the same run folder (``classifier.pt``, ``metrics.csv``, ``report.csv``, ``roc.png`` and
``errors.csv`` when rows were skipped):

* **fine-tuning** (default): an encoder plugin's network (DenseNet-121 as in CheXNet) plus the linear head of
  :mod:`xsel.train.head` on its pooled features, trained end to end — AdamW + OneCycle, gradient clipping,
  fp16 AMP on CUDA, light augmentation, optional class-balanced sampling. The fine-tuned backbone is saved
  as ``state_dict``, so ``xsel embed --encoder NAME --weights RUN/classifier.pt`` makes stores the head reads.
* **linear probe** (``store=``): only the head, fitted with :func:`xsel.train.head.fit_linear_head` on the
  embeddings of an existing store (rows matched by ``Path``): minutes on a CPU.

Both split labelled images by patient (never one ``PatientID`` on both sides), keep one epoch by the same rule
(:class:`EpochChoice`: the best mean validation AUROC, the last epoch while none is defined), and choose per-label
decision thresholds on validation.
Targets are (N, L) float arrays: 1 positive, 0 negative, NaN unknown (the uncertain policy already applied).

Pseudo-labels (``pseudo_labels``) come from the pool: rows without any known label (the CSV's own and
``--unlabeled``'s), minus rows whose Path is labelled or repeated and rows of validation patients. As in
FlexMatch (μ unlabelled per labelled sample), an epoch never lets them swamp the labels: see :func:`epoch_rows`.
An empty pool is an input error, not a silent run without pseudo-labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from torch import nn
from torch.utils.data import DataLoader

from xsel import plots
from xsel.encoders import create_encoder, model_identity
from xsel.errors import InputError
from xsel.io.images import decode_or_error
from xsel.io.table import (
    PATH_COLUMN,
    check_unique_paths,
    read_csv_checked,
    read_image_table,
    write_csv_atomic,
    write_errors_csv,
)
from xsel.labels import (
    FINDING_LABELS,
    UNCERTAIN_POLICIES,
    available_conditions,
    condition_labels,
    patient_ids,
    split_by_patient,
)
from xsel.progress import notify, progress_bar
from xsel.store import read_store
from xsel.train.head import (
    CHECKPOINT_NAME,
    LOSSES,
    LinearHead,
    build_head,
    fit_linear_head,
    label_weights,
    multilabel_loss,
    save_classifier,
)
from xsel.train.runtime import autocast_dtype, one_cycle, resolve_device

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


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Per-image draw weights that balance positives and negatives of every label.

    An image's weight is the mean over its known labels of that class's weight from
    :func:`xsel.train.head.label_weights` (N/(2·N₊) or N/(2·N₋)); with one label, positives and negatives are
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
    result = []
    for column in range(targets.shape[1]):
        known = ~np.isnan(targets[:, column])
        y = targets[known, column]
        result.append(roc_auc_score(y, probabilities[known, column]) if 0 < y.sum() < len(y) else np.nan)
    return np.asarray(result, dtype=np.float64)


@dataclass
class EpochChoice:
    """The one rule both training paths keep an epoch by: the highest mean validation AUROC (the earliest of
    equals); while no epoch has a defined AUROC, the latest. Offered epoch by epoch, so fine-tuning snapshots a
    network only when it becomes the kept one."""

    epoch: int = -1  # 0-based; -1 before the first offer
    val_auroc: float = math.nan

    def offer(self, epoch: int, val_auroc: float) -> bool:
        """Whether ``epoch`` becomes the kept one (the caller then keeps its state)."""
        if self.epoch >= 0 and not math.isnan(self.val_auroc) and not val_auroc > self.val_auroc:
            return False
        self.epoch, self.val_auroc = epoch, val_auroc
        return True


def best_epoch(mean_aurocs: list[float]) -> int:
    """Index of the epoch :class:`EpochChoice` keeps from a finished run's mean validation AUROCs."""
    choice = EpochChoice()
    for epoch, value in enumerate(mean_aurocs):
        choice.offer(epoch, float(value))
    return choice.epoch


def label_report(labels: list[str], targets: np.ndarray, probabilities: np.ndarray) -> pd.DataFrame:
    """Per-label AUROC, AP, and F1 and Cohen's kappa at the validation threshold that maximises F1.

    The threshold is chosen on the same validation images it is scored on, so F1 and kappa are optimistic;
    AUROC and AP do not depend on it. A label without both classes gets NaN metrics and threshold 0.5.
    """
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


@dataclass
class _StoreRows:
    """The CSV rows found in the store (``keep``), their embeddings, and one error per row it lacks."""

    keep: np.ndarray
    embeddings: np.ndarray | None = None
    identity: dict | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)


def _has_label(targets: np.ndarray) -> np.ndarray:
    """Rows with at least one known (or pseudo-) label."""
    return ~np.isnan(targets).all(axis=1)


def _read_rows(config: ClassifierConfig, csv: Path, image_root) -> tuple[list[str], list[Path], pd.DataFrame]:
    if config.store:
        frame = read_csv_checked(csv)
        paths = frame[PATH_COLUMN].astype(str)
        check_unique_paths(paths, csv)
        return paths.tolist(), [Path(p) for p in paths], frame
    table = read_image_table(csv, image_root)
    return table.paths, table.files, table.frame


def _read_all(
    config: ClassifierConfig, csv: Path, image_root
) -> tuple[list[str], list[Path], np.ndarray, list[str | None]]:
    """Paths, files, targets (N, L) and patients of the labelled CSV followed by ``--unlabeled``'s rows."""
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
    return paths, files, targets, patients


def _match_store(config: ClassifierConfig, csv: Path, paths: list[str]) -> _StoreRows:
    """Look every path up in ``config.store`` (fine-tuning: every row is kept)."""
    if not config.store:
        return _StoreRows(keep=np.ones(len(paths), dtype=bool))
    store = read_store(config.store)
    index = {path: row for row, path in enumerate(store.paths)}
    where = np.asarray([index.get(path, -1) for path in paths])
    keep = where >= 0
    if not keep.any():
        raise InputError(
            f"{csv}: none of its {len(paths)} Path values is in {config.store}; "
            f"embed this CSV into the store first (xsel embed {csv} --out {config.store})"
        )
    embeddings = np.zeros((len(paths), store.embeddings.shape[1]), dtype=np.float32)
    embeddings[keep] = store.embeddings[where[keep]]
    errors = [(paths[i], f"not in {Path(config.store).name}") for i in np.flatnonzero(~keep)]
    return _StoreRows(keep, embeddings, store.encoder_identity, errors)


def _pseudo_pool(paths, patients, targets, keep, labelled, val) -> np.ndarray:
    """Unlabelled rows that may be pseudo-labelled: not a labelled or repeated path, not a validation patient."""
    val_patients = {patients[i] for i in val if patients[i] is not None}
    seen = {paths[i] for i in labelled}  # a labelled image (validation above all) never returns as pseudo-labelled
    pool = []
    for i in np.flatnonzero(keep & ~_has_label(targets)):
        if paths[i] not in seen and (patients[i] is None or patients[i] not in val_patients):
            pool.append(i)
        seen.add(paths[i])
    return np.asarray(pool, dtype=np.int64)


def _report_split(config: ClassifierConfig, targets: np.ndarray, patients, train, val) -> list[str]:
    """Log the split; warn (and return the warnings) for labels whose validation AUROC cannot be defined."""
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
    return warnings


def _prepare(config: ClassifierConfig, csv: Path, image_root) -> tuple[_Data, list[str]]:
    """Read the CSV(s), apply the label policy, match the store, split by patient; log the split."""
    paths, files, targets, patients = _read_all(config, csv, image_root)
    store = _match_store(config, csv, paths)
    labelled = np.flatnonzero(store.keep & _has_label(targets))
    if len(labelled) == 0:
        raise InputError(f"{csv}: no row has a known value for {', '.join(config.labels)}")
    train_pos, val_pos = split_by_patient([patients[i] for i in labelled], config.val_fraction, config.seed)
    train, val = labelled[train_pos], labelled[val_pos]
    pool = _pseudo_pool(paths, patients, targets, store.keep, labelled, val)
    if config.pseudo_labels and len(pool) == 0:
        raise InputError(
            f"--pseudo-labels: no unlabelled row to pseudo-label (rows without a known {', '.join(config.labels)}, "
            "not already labelled, not of a validation patient"
            + (", and in the store" if config.store else "")
            + "); add --unlabeled CSV or leave out --pseudo-labels"
        )
    warnings = _report_split(config, targets, patients, train, val)
    files = None if config.store else files
    data = _Data(paths, files, store.embeddings, targets, train, val, pool, store.errors, store.identity)
    return data, warnings


# ---------------------------------------------------------------- the run


@dataclass
class _Trained:
    """What a training path hands back: the kept epoch's head and its validation predictions."""

    head: LinearHead
    identity: dict  # the encoder identity of the embedding space the head reads
    kept: EpochChoice
    val_rows: np.ndarray  # validation rows that decoded
    val_probabilities: np.ndarray  # (len(val_rows), L)
    device: str = "cpu"
    backbone_state: dict | None = None  # fine-tuning only
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, message) of undecodable images


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
        trained = _fit_probe(config, data, run_dir)
    else:
        trained = _fine_tune(config, data, run_dir, device, show_progress)
    report, checkpoint, errors = _write_run(config, data, trained, run_dir)
    return ClassifierResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        best_epoch=trained.kept.epoch + 1,
        best_val_auroc=trained.kept.val_auroc,
        report=report,
        train_images=len(data.train),
        val_images=len(data.val),
        skipped=len(errors),
        seconds=time.perf_counter() - started,
        device=trained.device,
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


def _write_run(
    config: ClassifierConfig, data: _Data, trained: _Trained, run_dir: Path
) -> tuple[pd.DataFrame, Path, list[tuple[str, str]]]:
    """report.csv, roc.png, classifier.pt and errors.csv (or the removal of a stale one) from the kept epoch."""
    targets = data.targets[trained.val_rows]
    report = label_report(config.labels, targets, trained.val_probabilities)
    write_csv_atomic(report, run_dir / REPORT)
    plot_roc(config.labels, targets, trained.val_probabilities, run_dir / ROC_PLOT)
    checkpoint = save_classifier(
        run_dir / CHECKPOINT_NAME,
        head=trained.head,
        labels=config.labels,
        encoder_identity=trained.identity,
        thresholds=report["threshold"].tolist(),
        config={**asdict(config), "best_epoch": trained.kept.epoch + 1},
        backbone_state=trained.backbone_state,
    )
    errors = data.errors + trained.errors
    write_errors_csv(run_dir / ERRORS, [path for path, _ in errors], [message for _, message in errors])
    return report, checkpoint, errors


# ---------------------------------------------------------------- what both paths share per epoch


@dataclass
class _History:
    """``metrics.csv``, rewritten after every epoch, and the epoch kept so far."""

    path: Path
    labels: list[str]
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict] = field(default_factory=list)
    kept: EpochChoice = field(default_factory=EpochChoice)

    def record(self, epoch: int, loss: float, aurocs: np.ndarray, pseudo: np.ndarray | None, lr: float) -> bool:
        """Log one epoch (``pseudo``: the pseudo-targets it trained with); True when it becomes the kept one."""
        mean = float(np.nanmean(aurocs)) if not np.isnan(aurocs).all() else float("nan")
        row = {"epoch": epoch + 1, "train_loss": loss, "val_auroc": mean}
        row |= {f"val_auroc_{label}": float(value) for label, value in zip(self.labels, aurocs, strict=True)}
        row["pseudo_labeled"] = 0 if pseudo is None else int(_has_label(pseudo).sum())
        row |= {
            f"pseudo_{label}": 0 if pseudo is None else int((~np.isnan(pseudo[:, c])).sum())
            for c, label in enumerate(self.labels)
        }
        self.rows.append(row | {"learning_rate": lr, "seconds": round(time.perf_counter() - self.started, 2)})
        write_csv_atomic(pd.DataFrame(self.rows), self.path)
        return self.kept.offer(epoch, mean)


def _pseudo_label(config: ClassifierConfig, probabilities: np.ndarray) -> np.ndarray:
    """Hard pseudo-targets (U, L) of the pool from its predicted probabilities (FlexMatch thresholds)."""
    return pseudo_targets(probabilities, flexmatch_thresholds(probabilities, config.pseudo_threshold))


# ---------------------------------------------------------------- linear probe on a store


def _fit_probe(config: ClassifierConfig, data: _Data, run_dir: Path) -> _Trained:
    """Linear probe: one fit per epoch when pseudo-labelling, else one.

    Each refit is full-batch on the labelled rows plus at most μ× as many pseudo-labelled rows (a seeded draw,
    :func:`epoch_rows`), so the pool cannot outweigh the labels.
    """
    x, y = data.embeddings, data.targets.copy()  # pool rows receive pseudo-labels in y
    history, kept, pseudo = _History(run_dir / METRICS, config.labels), None, None
    for epoch in range(config.epochs if config.pseudo_labels else 1):
        rows = data.train
        if pseudo is not None:
            y[data.pool] = pseudo
            chosen = data.pool[_has_label(pseudo)]
            length = epoch_length(len(data.train), len(chosen), pseudo_labels=True)
            rows = epoch_rows(data.train, chosen, length, seed=config.seed, epoch=epoch)
        head = fit_linear_head(
            x[rows],
            y[rows],
            loss=config.loss,
            epochs=config.probe_steps,
            learning_rate=config.lr(),
            weight_decay=config.weight_decay,
            seed=config.seed,
        )
        val_p = _probabilities(head, x[data.val])
        loss = _probe_loss(head, x[rows], y[rows], config.loss)
        if history.record(epoch, loss, label_auroc(y[data.val], val_p), pseudo, config.lr()):
            kept = head, val_p
        if config.pseudo_labels and epoch + 1 >= config.warmup_epochs:
            pseudo = _pseudo_label(config, _probabilities(head, x[data.pool]))
    head, val_p = kept
    return _Trained(head, data.identity, history.kept, data.val, val_p)


def _probabilities(head: LinearHead, embeddings: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(head(torch.from_numpy(embeddings)).double()).numpy()


def _probe_loss(head: LinearHead, embeddings: np.ndarray, targets: np.ndarray, loss: str) -> float:
    """The fitted head's training loss (what metrics.csv reports as ``train_loss``)."""
    pos_weight, neg_weight = (torch.as_tensor(w) for w in label_weights(targets))
    with torch.inference_mode():
        logits = head(torch.from_numpy(embeddings))
        y = torch.as_tensor(targets, dtype=torch.float32)
        return float(multilabel_loss(logits, y, loss=loss, pos_weight=pos_weight, neg_weight=neg_weight))


# ---------------------------------------------------------------- fine-tuning


def augment_seed(seed: int, epoch: int, row: int) -> int:
    """The augmentation seed of one row in one epoch: independent of batching, decode workers and prefetching."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1)[0])


def augment(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Light augmentation, one seed per image: rotation ±5°, scale ±5%, shift ±4%, contrast and brightness ±10%.

    No horizontal flips: the heart's side is anatomy, not noise.
    """
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


class ImageDataset:
    """Decodes and preprocesses images in DataLoader workers (training reads its batches in a seeded order);
    failures travel as messages, not exceptions."""

    def __init__(self, files: list[Path], rows: list[int], preprocessing: dict):
        self.files, self.rows, self.preprocessing = files, rows, preprocessing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        row = self.rows[position]
        return (row, *decode_or_error(self.files[row], self.preprocessing))


def collate_decoded(items):
    """(row, array | None, error | None) items → (rows, stacked batch of the decoded ones, failures)."""
    good = [(row, array) for row, array, error in items if error is None]
    rows = np.asarray([row for row, _ in good], dtype=np.int64)
    batch = torch.from_numpy(np.stack([array for _, array in good])) if good else None
    errors = [(row, error) for row, _, error in items if error is not None]
    return rows, batch, errors


def _loader(files: list[Path], rows: np.ndarray, preprocessing: dict, config: ClassifierConfig) -> DataLoader:
    """Batches of ``rows`` in the given order (the order itself is seeded by :func:`epoch_rows`); an undecodable
    image is dropped from its batch and its message travels beside it."""
    return DataLoader(
        ImageDataset(files, rows.tolist(), preprocessing),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=collate_decoded,
    )


def predict(
    backbone: nn.Module,
    head: LinearHead,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    failed: dict[int, str],
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that decoded and their probabilities (n, L) in eval mode; failures are added to ``failed``."""
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


@dataclass
class _FineTuning:
    """The state of a fine-tuning run, built once by :func:`_start_fine_tuning` and advanced epoch by epoch."""

    backbone: nn.Module
    head: LinearHead
    parameters: list[nn.Parameter]  # backbone's then head's: what AdamW updates and the gradient clip covers
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    preprocessing: dict
    pos_weight: torch.Tensor  # (L,) class weights from the labelled training rows
    neg_weight: torch.Tensor
    targets: np.ndarray  # (N, L): the labels, and the pool rows' current pseudo-labels
    pseudo_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pool rows labelled now
    failed: dict[int, str] = field(default_factory=dict)  # row → why its image could not be decoded

    def predict(self, rows: np.ndarray, files: list[Path], config: ClassifierConfig):
        """Decoded rows among ``rows`` and their probabilities (n, L); failures are remembered."""
        loader = _loader(files, rows, self.preprocessing, config)
        return predict(self.backbone, self.head, loader, self.device, self.amp_dtype, self.failed)

    def usable(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` without those whose image already failed to decode."""
        return np.asarray([r for r in rows if r not in self.failed], dtype=np.int64)


def _start_fine_tuning(config: ClassifierConfig, data: _Data, device: str, steps: int) -> _FineTuning:
    """The encoder plugin's network, a seeded head, AdamW with a OneCycle schedule over ``steps``, AMP on CUDA."""
    torch_device = resolve_device(device)
    amp_dtype = autocast_dtype("auto", torch_device)
    backbone = create_encoder(config.encoder, config.weights, image_size=config.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = build_head(int(backbone.embedding_dim), len(config.labels))
    backbone.to(torch_device)
    head.to(torch_device)
    parameters = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr(), weight_decay=config.weight_decay)
    schedule = one_cycle(optimizer, config.lr(), steps)
    scaler = torch.amp.GradScaler(torch_device.type, enabled=amp_dtype == torch.float16)
    targets = data.targets.copy()  # pool rows receive pseudo-labels here
    pos_weight, neg_weight = (torch.as_tensor(w).to(torch_device) for w in label_weights(targets[data.train]))
    return _FineTuning(
        backbone=backbone,
        head=head,
        parameters=parameters,
        optimizer=optimizer,
        schedule=schedule,
        scaler=scaler,
        device=torch_device,
        amp_dtype=amp_dtype,
        preprocessing=backbone.preprocessing,
        pos_weight=pos_weight,
        neg_weight=neg_weight,
        targets=targets,
    )


def _train_step(run: _FineTuning, config: ClassifierConfig, rows: np.ndarray, batch, epoch: int) -> float:
    """One optimiser step on a decoded batch (augmented with per-row seeds); returns its loss."""
    images = batch.to(run.device)
    if config.augment:
        images = augment(images, [augment_seed(config.seed, epoch, int(row)) for row in rows])
    y = torch.from_numpy(run.targets[rows]).float().to(run.device)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        logits = run.head(run.backbone(images))
    loss = multilabel_loss(logits, y, loss=config.loss, pos_weight=run.pos_weight, neg_weight=run.neg_weight)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.parameters, config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.schedule.step()
    return float(loss.detach())


def _train_epoch(run: _FineTuning, config: ClassifierConfig, data: _Data, epoch: int, length: int, advance) -> float:
    """One epoch of ``length`` seeded rows (labelled, and pseudo-labelled ones once there are); its mean loss."""
    labelled = run.usable(data.train)
    weights = sample_weights(run.targets[labelled]) if config.balanced_sampler else None
    order = epoch_rows(labelled, run.pseudo_rows, length, seed=config.seed, epoch=epoch, weights=weights)
    run.backbone.train()
    run.head.train()
    losses = []
    for rows, batch, errors in _loader(data.files, order, run.preprocessing, config):
        run.failed.update(errors)
        advance(len(rows) + len(errors))
        if batch is not None and len(rows) >= 2:  # batch norm needs two images
            losses.append(_train_step(run, config, rows, batch, epoch))
    if not losses and run.failed:
        row, message = next(iter(run.failed.items()))
        raise InputError(f"no training image could be decoded (first: {data.paths[row]}: {message})")
    if not losses:
        raise InputError("no training batch held two images; add images")
    return float(np.mean(losses))


def _relabel_pool(run: _FineTuning, config: ClassifierConfig, data: _Data) -> None:
    """Predict the pool and replace its pseudo-labels (rows without a confident label get none)."""
    pool_ok, pool_p = run.predict(run.usable(data.pool), data.files, config)
    pool_targets = _pseudo_label(config, pool_p)
    run.targets[data.pool] = np.nan
    run.targets[pool_ok] = pool_targets
    run.pseudo_rows = pool_ok[_has_label(pool_targets)]


def _fine_tune(config: ClassifierConfig, data: _Data, run_dir: Path, device: str, show_progress: bool) -> _Trained:
    """End-to-end training of backbone + head; returns the kept epoch's network and validation predictions."""
    length = epoch_length(len(data.train), len(data.pool), config.pseudo_labels)
    run = _start_fine_tuning(config, data, device, steps=config.epochs * math.ceil(length / config.batch_size))
    history, kept = _History(run_dir / METRICS, config.labels), None
    with progress_bar("Fine-tuning", total=config.epochs * length, show=show_progress) as advance:
        for epoch in range(config.epochs):
            loss = _train_epoch(run, config, data, epoch, length, advance)
            val_ok, val_p = run.predict(data.val, data.files, config)
            aurocs = label_auroc(run.targets[val_ok], val_p) if len(val_ok) else np.full(len(config.labels), np.nan)
            pseudo = run.targets[run.pseudo_rows] if len(run.pseudo_rows) else None
            if history.record(epoch, loss, aurocs, pseudo, run.schedule.get_last_lr()[0]):
                kept = _snapshot(run.backbone), _snapshot(run.head), val_ok, val_p
            if config.pseudo_labels and epoch + 1 >= config.warmup_epochs:
                _relabel_pool(run, config, data)
    backbone_state, head_state, val_ok, val_p = kept
    run.backbone.load_state_dict(backbone_state)
    run.head.load_state_dict(head_state)
    backbone, head = run.backbone.cpu(), run.head.cpu().eval()
    errors = [(data.paths[row], message) for row, message in sorted(run.failed.items())]
    return _Trained(
        head=head,
        identity=model_identity(config.encoder, backbone),
        kept=history.kept,
        val_rows=val_ok,
        val_probabilities=val_p,
        device=str(run.device),
        backbone_state=backbone.state_dict(),
        errors=errors,
    )


def _snapshot(module: nn.Module) -> dict:
    """A CPU copy of the module's weights, so later steps cannot change the kept epoch."""
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
