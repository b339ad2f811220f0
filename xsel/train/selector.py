"""``xsel train selector``: meta-learn a selector (MedSelect's LSTM or the set policy) with REINFORCE.

Each step draws a batch of episodes of one seen condition (train patients only) and rewards picks with the
query AUROC of the few-shot classifier fitted on their labels. MedSelect (``model="lstm"``) samples K picks
per episode *without* replacement by Gumbel-top-k on the scorer's logits; its baseline is the AUROC of K
random picks from the same pool, loss = −mean((R − R_random) · log p(picks)), log p the Plackett–Luce
probability of the ordered sample. The set policy (``model="set"``) samples ``samples`` sequences per episode,
one pick at a time, and each sequence's baseline is the mean reward of the others (leave-one-out).
``balanced`` is the share of steps whose pools are half positive instead of at natural prevalence.
With a ``teacher`` (a trained selector checkpoint, e.g. the LSTM) the set policy is distilled instead: each step
raises the log-probability of the teacher's deterministic picks on the batch's pools (teacher forcing). Measured
on the realcxr pack (BENCHMARKS.md §13), this carries the LSTM's gain at home into an order-free policy, where
REINFORCE from scratch or after imitation fell short of it.
Validation runs a fixed set of episodes of the unseen validation conditions on held-out patients with the
deterministic picks; the best checkpoint is kept. With ``average_steps`` N (the set model's default) the weights
validated and shipped are instead a moving average of the trained ones (time constant N steps; early in a run
each step weighs in proportion to its index), kept at every validation: one step's policy swings between
hospitals by more than selectors differ, the average does not, and two scarce validation conditions cannot say
which step is good where (measured in BENCHMARKS.md §13: the best-validated step was among the worst at home).
A validation condition too scarce for full-size episodes is validated on smaller ones (with a warning), or left
out when even those cannot be drawn.

Everything random derives from (seed, step), so ``resume`` continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch.optim.swa_utils import AveragedModel

from xsel import plugins
from xsel.constraints import stratum_values
from xsel.episodes import (
    MIN_QUERY_PER_CLASS,
    VALIDATION_QUERY_PER_CLASS,
    EpisodeTask,
    check_episodes_within,
    rows_of_labelling_groups,
)
from xsel.errors import InputError
from xsel.evaluate import evaluate, paired_margins
from xsel.identity import describe_identity
from xsel.io.atomic import write_text_atomic
from xsel.io.outputs import safe_name
from xsel.io.table import file_sha256
from xsel.labels import available_conditions, condition_labels, patient_ids, split_by_patient
from xsel.progress import notify, progress_bar
from xsel.resume import resumed_settings
from xsel.selectors import create_selector
from xsel.store import Store, check_finite, read_store
from xsel.train.checkpoints import gate_from_payload, gate_payload, save_torch_atomic
from xsel.train.medselect import (
    PLUGINS,
    SelectorConfig,
    build_policy,
    load_checkpoint,
    load_selector_checkpoint,
    pool_features,
    save_checkpoint,
    with_model_defaults,
)
from xsel.train.runtime import resolve_device
from xsel.trust import KEEP_LEARNED, MAX_REFERENCE, MIXTURE, TrustGate, calibrate_gate, check_clusters

BEST = "selector.pt"
LAST = "last.pt"
METRICS = "metrics.csv"
RESUMABLE = ("max_minutes",)  # a time budget does not change what is learned
FALLBACK_CANDIDATES = ("random", "kcenter", "typiclust", "kmedoids", "probcover")  # the trust gate's fallbacks
GATE_DRAWS = 100  # random pools of held-out images the trust gate's threshold is calibrated on
GATE_ENTRIES = ("trust_gate", "trust_reference", "heuristics_val")


@dataclass(frozen=True)
class TrainResult:
    """Where the run wrote its files and how it ended."""

    run_dir: Path
    steps: int
    episodes: int
    best_val_auroc: float  # with weight averaging: the shipped (last validated) average's
    best_step: int
    random_val_auroc: float
    averaged: bool  # selector.pt holds the weights averaged up to best_step, not the best-validated step
    seconds: float
    stopped_by: str


def plackett_luce_log_prob(logits, picks):
    """log P(ordered picks) under Plackett–Luce: Σ_j [l(i_j) − logsumexp(l over items not yet picked)].

    ``logits`` (B, N), ``picks`` (B, K) → (B,). This is the exact probability of the ordered sample that
    Gumbel-top-k draws."""
    chosen = logits.gather(1, picks)
    taken = torch.zeros_like(logits, dtype=torch.bool)
    total = torch.zeros(logits.shape[0], dtype=logits.dtype)
    for step in range(picks.shape[1]):
        total = total + chosen[:, step] - torch.logsumexp(logits.masked_fill(taken, float("-inf")), dim=1)
        taken = taken.scatter(1, picks[:, step : step + 1], True)
    return total


def gumbel_top_k(logits, k: int, generator):
    """K indices per row sampled without replacement with probabilities softmax(logits) (ordered)."""
    uniform = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-7)
    return torch.topk(logits.detach() - torch.log(-torch.log(uniform)), k, dim=1).indices


def batch_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (B, M) scores against (B, M) 0/1 labels, ties counted half (rank formula)."""
    ranks = rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels).sum(axis=1)
    return (rank_sum - positives * (positives + 1) / 2) / np.maximum(positives * negatives, 1)


class _Episodes:
    """Batches of episodes as arrays: pools (B, N, D′), labels, and query sets."""

    def __init__(
        self, store: Store, config: SelectorConfig, conditions: list[str], rows: np.ndarray, *, validation: bool
    ):
        self.store, self.config, self.features = store, config, pool_features(config)
        self.tasks, self.warnings = [], []
        for condition in conditions:
            try:
                task = self._task(condition, rows, min_query_per_class=MIN_QUERY_PER_CLASS)
            except InputError as full_size:
                if not validation:
                    raise
                try:  # validation shrinks for a scarce condition instead of stopping the run
                    task = self._task(condition, rows, min_query_per_class=VALIDATION_QUERY_PER_CLASS)
                except InputError:
                    self.warnings.append(f"validation leaves out {full_size}")
                    continue
            self.tasks.append(task)
            if task.warning:
                self.warnings.append(task.warning)
        if not self.tasks:
            raise InputError(
                "no validation condition has enough images among the validation patients: "
                + "; ".join(self.warnings)
                + "; name other --val-conditions or raise --val-fraction"
            )
        self.classifier = plugins.get("classifier", config.classifier).factory

    def _task(self, condition: str, rows: np.ndarray, *, min_query_per_class: int) -> EpisodeTask:
        return episode_task(self.store, self.config, condition, rows, min_query_per_class=min_query_per_class)

    def batch(self, task: EpisodeTask, indices: list[int], seed: int, *, balanced: bool = False):
        episodes = [task.episode(i, seed, balanced=balanced) for i in indices]
        size = min(len(e.pool) for e in episodes)  # equal lengths for one tensor (they rarely differ)
        pools = np.stack(
            [
                self.features.inputs(self.store.embeddings[e.pool[:size]], self.store.meta.iloc[e.pool[:size]])
                for e in episodes
            ]
        )
        labels = np.stack([e.pool_labels[:size] for e in episodes])
        return episodes, pools, labels, size

    def rewards(self, episodes, picks: np.ndarray) -> np.ndarray:
        """Query AUROC per episode of the classifier fitted on each episode's picks (loop over episodes only)."""
        scores, labels = [], []
        for episode, chosen in zip(episodes, picks, strict=True):
            pool = self.store.embeddings[episode.pool]
            model = self.classifier().fit(pool[chosen], episode.pool_labels[chosen])
            scores.append(model.decision_function(self.store.embeddings[episode.query]))
            labels.append(episode.query_labels)
        return batch_auroc(np.stack(labels), np.stack(scores))


def episode_task(
    store: Store, config: SelectorConfig, condition: str, rows: np.ndarray, *, min_query_per_class: int
) -> EpisodeTask:
    """The episodes of one condition among ``rows`` (those of the sources that label it, with
    ``episodes_within``), sized as the config asks."""
    if config.episodes_within:
        rows = rows_of_labelling_groups(store, condition, config.episodes_within, uncertain=config.uncertain, rows=rows)
    return EpisodeTask(
        store,
        condition,
        negative=config.negative,
        uncertain=config.uncertain,
        pool_size=config.pool_size,
        query_size=config.query_size,
        k=config.k,
        rows=rows,
        min_query_per_class=min_query_per_class,
    )


ALL_CONDITIONS = "all"


def every_labelled_condition(store: Store, config: SelectorConfig) -> list[str]:
    """``--conditions all``: every label column with enough images for episodes among the training patients,
    except the negative class and the validation conditions (those left out are named in a note)."""
    train_rows, _ = split_patients(store, config.val_fraction, config.seed)
    excluded = {name.strip() for name in config.negative.split(",")} | set(config.val_conditions)
    kept, scarce = [], []
    for condition in available_conditions(store.meta):
        if condition in excluded:
            continue
        try:
            episode_task(store, config, condition, train_rows, min_query_per_class=MIN_QUERY_PER_CLASS)
            kept.append(condition)
        except InputError:
            scarce.append(condition)
    if scarce:
        notify(f"--conditions all leaves out {', '.join(scarce)}: too few images among the training patients")
    if not kept:
        raise InputError(f"--conditions all: no label column of {store.path} has enough images for episodes")
    return kept


def _split_digest(train_rows: np.ndarray) -> str:
    """What a resumed run must find again: the rows it trains on (validation is the rest)."""
    return hashlib.sha256(np.asarray(train_rows, dtype=np.int64).tobytes()).hexdigest()


def _check_trained_on(saved: dict, store: Store, where, remedy: str, *, train_rows: np.ndarray | None = None) -> None:
    """Refuse (one line, ``remedy`` said) a checkpoint trained on another store: another encoder or number of rows,
    or — given the ``train_rows`` this store's split yields — another split of its patients."""
    if (saved["encoder_identity"], saved.get("store_rows", len(store))) != (store.encoder_identity, len(store)):
        raise InputError(
            f"{where} was trained on a store of {saved.get('store_rows')} embeddings of "
            f"{describe_identity(saved['encoder_identity'])}; {store.path} holds {len(store)} of "
            f"{describe_identity(store.encoder_identity)}: {remedy}"
        )
    if train_rows is not None and saved.get("split_sha256") != _split_digest(train_rows):
        raise InputError(
            f"{where} was trained with another split of the patients into training and validation (a run started by "
            f"an earlier xsel, or a changed PatientID column): {remedy}"
        )


def split_patients(store: Store, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of training and validation patients (:func:`xsel.labels.split_by_patient` over the store's rows)."""
    patients = patient_ids(store.meta)
    return split_by_patient([None] * len(store) if patients is None else list(patients), fraction, seed)


@dataclass
class RunState:
    """Where a run stands; saved in ``last.pt`` with the weights, optimizer and schedule."""

    step: int = 0
    best_val: float = -np.inf
    best_step: int = 0
    seconds: float = 0.0  # over every invocation of the run


@dataclass
class _Training:
    """What one invocation works with: the scorer, its optimizer and schedule, the episodes, the run folder."""

    config: SelectorConfig
    run_dir: Path
    scorer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    train: _Episodes
    val: _Episodes
    device: torch.device
    identity: dict
    total_steps: int
    store_rows: int  # with the identity, what a resumed run must find again
    train_rows: np.ndarray
    averaged: AveragedModel | None  # the moving average of the scorer's weights (``average_steps``), else None
    teacher: torch.nn.Module | None  # the selector whose picks the set policy imitates (``config.teacher``)
    gate: dict = field(default_factory=dict)  # the trust gate's checkpoint entries, saved with every checkpoint

    @property
    def policy(self) -> torch.nn.Module:
        """What validation scores and ``selector.pt`` ships: the averaged weights once averaging has begun."""
        if self.averaged is not None and int(self.averaged.n_averaged) > 0:
            return self.averaged.module
        return self.scorer


def train_selector(
    store: str | Path | Store,
    run_dir: str | Path,
    config: SelectorConfig | dict | None = None,
    *,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
    start_from: dict | None = None,
) -> TrainResult:
    """Train a selector on ``config.conditions``, validate on ``config.val_conditions``; files in ``run_dir``.

    Writes ``selector.pt`` (the best-validated step, or the last validated average with ``average_steps``),
    ``last.pt`` (for ``resume``) and ``metrics.csv``. With ``resume`` the run goes on with the settings saved in
    ``last.pt``; ``config`` may then be None, or the settings asked for again (a dict of some, or a whole config):
    changing one other than ``max_minutes`` is refused. ``start_from``: a trained selector's checkpoint payload
    whose weights the run starts from and whose trust gate it keeps (adaptation).
    """
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    run_dir = Path(run_dir)
    if not resume and any((run_dir / name).exists() for name in (LAST, BEST, METRICS)):
        raise InputError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    saved = load_checkpoint(run_dir / LAST) if resume and (run_dir / LAST).exists() else None
    if saved is not None:
        _check_trained_on(saved, store, run_dir / LAST, "resume on the same store, or start a new run")
    config = _run_config(config, saved, run_dir)
    check_episodes_within(store, config.episodes_within)
    if saved is None and config.conditions == [ALL_CONDITIONS]:
        config.conditions = every_labelled_condition(store, config)
    _check_config(config)
    if saved is None and config.use_metadata:  # ages are z-scored with the training store's statistics
        ages = np.asarray(store.meta["Age"], dtype=np.float64) if "Age" in store.meta.columns else np.array([])
        ages = ages[np.isfinite(ages)]
        config.age_mean, config.age_std = (float(ages.mean()), float(ages.std() or 1.0)) if len(ages) else (0.0, 1.0)
    device = resolve_device(device)
    teacher = _teacher(store, config, device)  # before any episode is drawn: a wrong file fails fast
    training = _start(store, config, run_dir, device, teacher)
    if saved is not None:
        _check_trained_on(saved, store, run_dir / LAST, "start a new run", train_rows=training.train_rows)
    state = RunState()
    if saved is None and start_from is not None:  # adaptation starts from a trained selector
        training.scorer.load_state_dict(start_from["state_dict"])
    if saved is not None:
        training.scorer.load_state_dict(saved["state_dict"])
        training.optimizer.load_state_dict(saved["optimizer"])
        training.scheduler.load_state_dict(saved["scheduler"])
        if training.averaged is not None:
            training.averaged.load_state_dict(saved["averaged"])
        state = RunState(saved["step"], saved["best_val"], saved["best_step"], saved["seconds"])
        _truncate_metrics(run_dir / METRICS, state.step)  # rows logged after the last checkpoint are redone
        training.gate = {key: saved[key] for key in GATE_ENTRIES if key in saved}
    elif start_from is not None:
        training.gate = {key: start_from[key] for key in GATE_ENTRIES if key in start_from}
    else:
        training.gate = _trust_gate(training)
    random_val = _mean_val(training, None)
    if saved is None and start_from is not None:  # the weights it starts from are the first candidate
        state.best_val = _mean_val(training, training.scorer)
        _save(training, BEST, {"step": 0, "val_auroc": state.best_val, "val_random_auroc": random_val})
        notify(
            f"the starting weights validate at {state.best_val:.3f} (random picks {random_val:.3f}); trained "
            "weights replace them only where they validate better"
        )
    started = time.perf_counter()  # --max-minutes budgets this invocation; state.seconds carries the run's total
    stopped_by = "episodes"
    with progress_bar("Training", total=training.total_steps, unit="steps", show=show_progress) as advance:
        advance(state.step)
        while state.step < training.total_steps:
            if time.perf_counter() - started > config.max_minutes * 60:
                stopped_by = "time budget"
                break
            row = _train_step(training, state.step)
            state.step += 1
            if state.step % config.val_every == 0 or state.step == training.total_steps:
                row |= _validate_and_save(training, state, random_val, started)
            _append_metrics(run_dir / METRICS, row, config.val_conditions)
            advance(1)
    if state.best_step == 0 and not (run_dir / BEST).exists():  # stopped before the first validation
        state.best_val = _mean_val(training, training.policy)
        state.best_step = state.step
        _save(training, BEST, {"step": state.step, "val_auroc": state.best_val, "val_random_auroc": random_val})
    if state.best_val < random_val:
        notify(
            f"selector.pt validates below random picks ({state.best_val:.3f} < {random_val:.3f}) on "
            f"{', '.join(config.val_conditions)}: on conditions it was not trained on it picks worse than random "
            "(it learned the training conditions' look); check it with `xsel evaluate` before use, or select with "
            "a heuristic"
        )
    return TrainResult(
        run_dir=run_dir,
        steps=state.step,
        episodes=state.step * config.batch_size,
        best_val_auroc=float(state.best_val),
        best_step=state.best_step,
        random_val_auroc=random_val,
        averaged=training.averaged is not None,
        seconds=state.seconds + time.perf_counter() - started,
        stopped_by=stopped_by,
    )


PSEUDO_NEGATIVE = "(any other cluster)"


def adapt_selector(
    checkpoint: str | Path,
    unlabeled: str | Path | Store,
    run_dir: str | Path,
    *,
    clusters: int = 8,
    max_minutes: float = 3.0,
    episodes: int = 100_000,
    seed: int = 0,
    resume: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> TrainResult:
    """Adapt a trained selector to a site's own images without a label: meta-train it further on pseudo-tasks.

    The site's embeddings are clustered (k-means on unit rows, ``clusters`` clusters); each cluster is a
    pseudo-condition (its images positive, every other image negative), the two largest clusters validate and the
    others with enough images for episodes train. Label columns the store may have are dropped first. The run
    starts from ``checkpoint``'s weights and settings (K, pool and query sizes, model). The shipped weights are
    validated first and stay ``selector.pt`` unless adapted weights validate better on the pseudo-tasks
    (``best_step`` 0: adaptation did not help). The trust gate is the shipped one, unchanged: pseudo-task rewards do
    not rank selectors as a site's findings do (BENCHMARKS.md §13), so adaptation is no evidence that the site's
    pools are ones the selector picks well; a gate recalibrated on the site went quiet there even where adaptation
    kept the shipped weights (−0.263 instead of the fallback's −0.048). Whether the adapted policy should pick
    away is for labels to decide (``choose_fallback``). Files as :func:`train_selector` writes them."""
    payload, trained = load_selector_checkpoint(checkpoint)
    gate_from_payload(payload)  # a gate this xsel cannot read is refused now, not after the adaptation's minutes
    site = unlabeled if isinstance(unlabeled, Store) else read_store(unlabeled)
    if site.encoder_identity != payload["encoder_identity"]:
        raise InputError(
            f"{checkpoint} was trained on embeddings of {describe_identity(payload['encoder_identity'])}, "
            f"{site.path} holds {describe_identity(site.encoder_identity)}: embed the site with the same encoder"
        )
    pseudo = pseudo_labelled(site, clusters, seed)
    names = [c for c in pseudo.meta.columns if c.startswith("cluster ")]
    config = SelectorConfig(
        **{
            **asdict(trained),
            "conditions": [ALL_CONDITIONS],  # every other cluster with enough images for episodes
            "val_conditions": names[:2],  # the largest: a small archive still has validation images in them
            "negative": PSEUDO_NEGATIVE,
            "episodes": episodes,
            "max_minutes": max_minutes,
            "seed": seed,
            "average_steps": 0,  # adapted weights replace the shipped ones only where they validate better
            "episodes_within": "",  # pseudo-tasks come from one site
            "teacher": "",  # pseudo-tasks reward picks (REINFORCE); a teacher's picks know nothing of the site
            "teacher_sha256": "",
            "extra": {"adapted_from": file_sha256(checkpoint), "clusters": clusters},
        }
    )
    result = train_selector(
        pseudo,
        run_dir,
        None if resume else config,
        resume=resume,
        device=device,
        show_progress=show_progress,
        start_from=payload,
    )
    _say_where_the_gate_fires(payload, site, config)
    return result


SITE_POOLS = 20  # random site pools the shipped gate is tried on after adaptation


def _say_where_the_gate_fires(payload: dict, site: Store, config: SelectorConfig) -> None:
    """Tell the site how often the (shipped) trust gate hands its pools to the fallback, and what to do about it."""
    gate = gate_from_payload(payload)
    if gate is None or gate.fallback == KEEP_LEARNED:  # no gate, or the selector keeps picking when it fires
        return
    size = min(config.pool_size, len(site))
    rng = np.random.default_rng([config.seed, SITE_POOLS])
    pools = [site.embeddings[np.sort(rng.choice(len(site), size, replace=False))] for _ in range(SITE_POOLS)]
    fired = sum(gate.check(pool, seed=config.seed).fired for pool in pools)
    if fired:
        notify(
            f"the trust gate is the shipped one: it fell back to {gate.fallback} on {fired}/{SITE_POOLS} random pools "
            f"of {size} site images; to let the adapted selector pick here, choose the fallback on labelled site "
            "images (--choose-fallback) or select with --no-trust-gate"
        )


@dataclass(frozen=True)
class FallbackChoice:
    """What :func:`choose_fallback` wrote and why: the chosen fallback, every candidate's mean query AUROC, and each
    other candidate's paired Δ against the chosen one with its 95% CI (``margins``: ``diff``, ``low``, ``high``)."""

    checkpoint: Path
    fallback: str
    auroc: dict[str, float]
    margins: dict[str, dict[str, float]]

    @property
    def undecided(self) -> list[str]:
        """The other candidates whose CI reaches the chosen one (best gap first): not told apart by the episodes."""
        close = [name for name, margin in self.margins.items() if margin["high"] >= 0]
        return sorted(close, key=lambda name: -self.margins[name]["diff"])

    @property
    def decided(self) -> bool:
        """Whether every other candidate's CI lies below the chosen one."""
        return not self.undecided


def choose_fallback(
    checkpoint: str | Path,
    shifted: str | Path | Store,
    run_dir: str | Path,
    *,
    conditions: list[str],
    negative: str = "No Finding",
    episodes: int = 60,
    seed: int = 0,
    show_progress: bool = True,
) -> FallbackChoice:
    """Choose what a trained selector's trust gate falls back to, on labelled pools from another hospital.

    Training picks the fallback on held-out patients of the training hospital, where the learned selector is at
    home; but the gate fires on pools from elsewhere, where a heuristic that won at home may be the worse choice
    (measured: a set selector gaining +0.04 away fell back to a heuristic gaining +0.01). Here every candidate
    heuristic and the learned selector itself run paired episodes (the checkpoint's K, pool and query sizes and
    classifier) on ``shifted`` — a labelled store from a hospital the selector was not trained on — and the best
    mean query AUROC becomes the fallback; ``learned`` (:data:`xsel.trust.KEEP_LEARNED`) when the selector beat every
    heuristic: the gate still reports an unfamiliar pool, and the selector keeps picking. Writes
    ``RUN_DIR/selector.pt``: the same weights and gate threshold, the new fallback, and ``fallback_validation``
    (store, conditions, every candidate's AUROC)."""
    payload, config = _gated_checkpoint(checkpoint)
    shifted = shifted if isinstance(shifted, Store) else read_store(shifted)
    learned = f"{PLUGINS[config.model]}={payload['path']}"
    table = _candidates_episodes(shifted, conditions, learned, config, negative, episodes, seed, show_progress)
    validation = {"store": str(shifted.path), "conditions": list(conditions), "negative": negative}
    where = f"on {Path(shifted.path).name} ({', '.join(conditions)})"
    return _with_fallback(payload, [table], validation | {"episodes": episodes}, run_dir, where, seed)


def referee_away(
    checkpoint: str | Path,
    store: str | Path | Store,
    run_dir: str | Path,
    *,
    column: str | None = None,
    max_minutes: float = 10.0,
    episodes: int = 60,
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> FallbackChoice:
    """Choose a trust gate's fallback leave-one-hospital-out, on the labelled store a selector was trained on.

    The gate fires on a pool from a hospital the selector never saw, so its fallback should be what picks best at
    hospitals never trained on — not what won at home. For each hospital (each value of ``column``, default the
    run's ``--episodes-within``) in turn, a selector trains as this one did on the other hospitals' images alone
    (``max_minutes``; its conditions and validation conditions those they label) in ``RUN_DIR/without-VALUE``; then
    it and every heuristic pick paired episodes of the conditions the held-out hospital labels, on all its images
    (none seen by that selector). When the run's validation conditions are labelled at the held-out hospital alone,
    the sub-run validates on the training condition with the most positives instead and trains on the others:
    validation stays unseen, and a hospital that labels every validation condition can referee too. The best mean
    query AUROC over the held-out hospitals becomes the fallback — ``learned`` when the selectors trained without a
    hospital beat every heuristic there: the gate still reports an unfamiliar pool and this selector keeps picking.
    A hospital whose images label none of the run's conditions, or without which neither a validation condition nor
    a second training condition is left, is left out (said so). Writes ``RUN_DIR/selector.pt`` as
    :func:`choose_fallback` does, ``fallback_validation`` holding every held-out hospital's scores."""
    payload, config = _gated_checkpoint(checkpoint)
    store = store if isinstance(store, Store) else read_store(store)
    column = column or config.episodes_within
    if not column:
        raise InputError(
            f"{payload['path']} was trained without --episodes-within; name the column of each image's hospital "
            "(--episodes-within COLUMN) to referee its fallback leave-one-hospital-out"
        )
    if config.teacher:
        raise InputError(
            f"{payload['path']} was distilled from {config.teacher}, which saw every hospital: referee the teacher "
            "with --referee-away, or choose this selector's fallback with --choose-fallback on another hospital"
        )
    check_episodes_within(store, column)
    hospitals = stratum_values(store.meta, column).to_numpy()
    tables, left_out, moved = {}, [], []
    for value in np.unique(hospitals):
        held, rest = store.subset(hospitals == value), store.subset(hospitals != value)
        conditions = _labelled(held, [*config.conditions, *config.val_conditions], config.uncertain)
        train_on = _labelled(rest, config.conditions, config.uncertain)
        validate_on = _labelled(rest, config.val_conditions, config.uncertain)
        if not validate_on and len(train_on) > 1:  # the run's validation conditions are the held-out hospital's
            validate_on = [max(train_on, key=lambda c: _positives(rest, c, config.uncertain))]
            train_on = [c for c in train_on if c not in validate_on]
            moved.append(f"{validate_on[0]} without {value}")
        sub = replace(config, conditions=train_on, val_conditions=validate_on, max_minutes=max_minutes)
        reasons = (
            (conditions, "labels none of the run's conditions"),
            (sub.conditions, "the other hospitals label no training condition"),
            (sub.val_conditions, "the other hospitals label no validation condition and a single training condition"),
        )
        why = next((reason for found, reason in reasons if not found), None)
        if why is not None:
            left_out.append(f"{value} ({why})")
            continue
        folder = Path(run_dir) / f"without-{safe_name(str(value), 'blank')}"
        try:
            if not (folder / BEST).exists():  # a rerun reuses what an earlier one trained
                train_selector(rest, folder, sub, device=device, show_progress=show_progress)
            learned = f"{PLUGINS[config.model]}={folder / BEST}"
            tables[str(value)] = _candidates_episodes(
                held, conditions, learned, config, config.negative, episodes, seed, show_progress
            )
        except InputError as error:  # too few images of a condition on one side: that hospital cannot referee
            left_out.append(f"{value} ({error})")
    if moved:
        notify(
            "leave-one-hospital-out referee: the other hospitals label none of the run's validation conditions, so "
            "their training condition with the most positives validates: " + "; ".join(moved)
        )
    if left_out:
        notify(f"leave-one-hospital-out referee: left out {column} " + "; ".join(left_out))
    if not tables:
        raise InputError(
            f"no hospital of {column} could be held out ("
            + "; ".join(left_out)
            + "); choose the fallback on another hospital's labelled store with --choose-fallback"
        )
    validation = {
        "store": str(store.path),
        "protocol": "leave-one-hospital-out",
        "column": column,
        "hospitals": {hospital: _mean_auroc(table) for hospital, table in tables.items()},
        "episodes": episodes,
        "max_minutes": max_minutes,
    }
    where = f"leave-one-hospital-out over {len(tables)} values of {column}"
    return _with_fallback(payload, list(tables.values()), validation, run_dir, where, seed)


def _positives(store: Store, condition: str, uncertain: str) -> int:
    return int((condition_labels(store.meta, condition, uncertain=uncertain) == 1).sum())


def _labelled(store: Store, conditions: list[str], uncertain: str) -> list[str]:
    """Those of ``conditions`` with at least one positive image in ``store``."""
    present = set(available_conditions(store.meta))
    return [c for c in dict.fromkeys(conditions) if c in present and _positives(store, c, uncertain) > 0]


def _gated_checkpoint(checkpoint: str | Path) -> tuple[dict, SelectorConfig]:
    """A selector checkpoint and its config, refused (one line) when it carries no trust gate."""
    payload, config = load_selector_checkpoint(checkpoint)
    if payload.get("trust_gate") is None:
        raise InputError(f"{payload['path']} carries no trust gate (trained before xsel had one); retrain it")
    return payload, config


def _candidates_episodes(
    store: Store,
    conditions: list[str],
    learned: str,
    config: SelectorConfig,
    negative: str,
    episodes: int,
    seed: int,
    show_progress: bool,
) -> pd.DataFrame:
    """Every fallback candidate's paired episodes on ``store`` (the checkpoint's K, pool and query sizes and
    classifier; no gate): the heuristics, and ``learned`` (a selector spec), whose rows are named ``KEEP_LEARNED``."""
    result = evaluate(
        store,
        conditions,
        selectors=[*FALLBACK_CANDIDATES, learned],
        k=[config.k],
        episodes=episodes,
        pool_size=config.pool_size,
        query_size=config.query_size,
        classifier=config.classifier,
        negative=negative,
        seed=seed,
        show_progress=show_progress,
        trust_gate=False,
    )
    table = result.episodes
    return table.assign(selector=table["selector"].replace({learned.split("=", 1)[0]: KEEP_LEARNED}))


def _mean_auroc(table: pd.DataFrame) -> dict[str, float]:
    """Each candidate's mean query AUROC over the conditions of an episode table (each condition weighing the same)."""
    per_condition = table.groupby(["selector", "condition"])["auroc"].mean()
    return {name: float(per_condition[name].mean()) for name in [*FALLBACK_CANDIDATES, KEEP_LEARNED]}


def _with_fallback(
    payload: dict, tables: list[pd.DataFrame], validation: dict, run_dir: str | Path, where: str, seed: int
) -> FallbackChoice:
    """Write ``RUN_DIR/selector.pt``: the checkpoint with the candidate of the best mean query AUROC over ``tables``
    (each weighing the same) as its gate's fallback, and what chose it (``fallback_validation``: ``validation``, every
    candidate's AUROC, and every other candidate's paired margin to the chosen one); say so, and say when another
    candidate stayed within the episodes' noise: which heuristic pays is a property of the site (BENCHMARKS.md
    section 13), so an undecided choice may be worth more labelled site images."""
    per_table = [_mean_auroc(table) for table in tables]
    auroc = {name: float(np.mean([scores[name] for scores in per_table])) for name in per_table[0]}
    fallback = max(auroc, key=auroc.get)
    margins = paired_margins(tables, fallback, seed=seed)
    choice = FallbackChoice(checkpoint=Path(run_dir) / BEST, fallback=fallback, auroc=auroc, margins=margins)
    chosen = {key: value for key, value in payload.items() if key != "path"}
    chosen["trust_gate"] = {**payload["trust_gate"], "fallback": fallback}
    chosen["fallback_validation"] = validation | {"auroc": auroc, "chosen": fallback, "margins": margins}
    choice.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(chosen, choice.checkpoint)
    notify(
        f"trust gate fallback {where}: mean query AUROC "
        + ", ".join(f"{name} {value:.3f}" for name, value in auroc.items())
        + f"; falls back to {fallback}"
        + (" (the learned selector keeps picking)" if fallback == KEEP_LEARNED else "")
        + f"; {fallback_margin(choice)}"
    )
    return choice


def fallback_margin(choice: FallbackChoice) -> str:
    """Whether the labelled episodes decided the fallback: the closest other candidate's paired Δ against it."""
    close = choice.undecided
    name = close[0] if close else max(choice.margins, key=lambda other: choice.margins[other]["diff"])
    margin = choice.margins[name]
    text = f"{name} {margin['diff']:+.3f} [{margin['low']:+.3f}, {margin['high']:+.3f}]"
    if not close:
        return f"decided: runner-up {text}"
    others = f" and {len(close) - 1} more" if len(close) > 1 else ""
    return (
        f"not decided: {text}{others} within these episodes' noise (they reuse the same images; more labelled "
        "images may tell them apart)"
    )


def recalibrate_gate(
    checkpoint: str | Path, store: str | Path | Store, run_dir: str | Path, *, clusters: int | None = None
) -> Path:
    """A trained selector's trust gate calibrated afresh by this xsel, on ``store`` — the store it was trained on
    (same encoder, rows and patients' split, checked) — written with the same weights, settings and fallback to
    ``RUN_DIR/selector.pt``: a run trained with ``--episodes-within`` before the gate kept a reference per hospital
    gets one without training again. Store size and split are checked where the checkpoint records them (all since
    this function exists). ``clusters``: k-means clusters per reference (1: whole, as before xsel split them; None:
    as training calibrates it, :func:`xsel.trust.calibrate_gate`)."""
    clusters = check_clusters(clusters)
    payload, config = load_selector_checkpoint(checkpoint)
    store = store if isinstance(store, Store) else read_store(store)
    remedy = "recalibrate on the store it was trained on"
    _check_trained_on(payload, store, payload["path"], remedy)
    training = _start(store, config, Path(run_dir), torch.device("cpu"), None)  # the gate needs no teacher
    if "split_sha256" in payload:  # checkpoints written before every one recorded it are checked by encoder alone
        _check_trained_on(payload, store, payload["path"], remedy, train_rows=training.train_rows)
    entries = _trust_gate(training, clusters=clusters)
    fallback = (payload.get("trust_gate") or {}).get("fallback", entries["trust_gate"]["fallback"])
    entries["trust_gate"] = {**entries["trust_gate"], "fallback": fallback}
    recalibrated = {key: value for key, value in payload.items() if key != "path"} | entries
    path = Path(run_dir) / BEST
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(recalibrated, path)
    return path


def pseudo_labelled(store: Store, clusters: int, seed: int) -> Store:
    """The store without its label columns (adaptation reads no label), plus one 0/1 column per k-means cluster
    (largest first) and a negative column true everywhere."""
    from xsel.geometry import cluster_labels, unit_rows

    if clusters < 4 or len(store) < 10 * clusters:
        raise InputError(
            f"--clusters {clusters} on {len(store)} images: use at least 4 clusters and 10 images per cluster"
        )
    labels = cluster_labels(unit_rows(store.embeddings).astype(np.float64), clusters, seed)
    order = np.argsort(-np.bincount(labels, minlength=clusters), kind="stable")
    meta = store.meta.drop(columns=available_conditions(store.meta))
    for rank, cluster in enumerate(order, 1):
        meta[f"cluster {rank}"] = (labels == cluster).astype(np.int8)
    meta[PSEUDO_NEGATIVE] = 1
    return Store(path=store.path, embeddings=store.embeddings, paths=store.paths, meta=meta, attrs=store.attrs)


def _run_config(config: SelectorConfig | dict | None, saved: dict | None, run_dir: Path) -> SelectorConfig:
    """A new run's config as given; a resumed run's as saved, with what this invocation asks for checked."""
    if saved is None:
        if isinstance(config, SelectorConfig):
            return config
        settings = dict(config or {})
        if "conditions" not in settings or "val_conditions" not in settings:
            raise InputError(
                f"{run_dir}: nothing to resume (no {LAST}); give --conditions and --val-conditions to start a run"
            )
        return SelectorConfig(**settings)
    requested = asdict(config) if isinstance(config, SelectorConfig) else dict(config or {})
    if isinstance(config, SelectorConfig) and config.use_metadata:  # set from the store when the run began
        requested = {key: value for key, value in requested.items() if key not in ("age_mean", "age_std")}
    # a run saved before xsel averaged weights (or kept episodes within sources) did neither
    saved_config = {"average_steps": 0, "episodes_within": ""} | saved["config"]
    settings = resumed_settings(saved_config, requested, where=run_dir / LAST, may_change=RESUMABLE)
    known = set(SelectorConfig.__dataclass_fields__)
    return SelectorConfig(**{key: value for key, value in settings.items() if key in known})


def _check_config(config: SelectorConfig) -> None:
    with_model_defaults(config)
    if not config.conditions:
        raise InputError("--conditions is empty: name the seen conditions to train on")
    if not config.val_conditions:
        raise InputError("--val-conditions is empty: name conditions held out for validation")
    if set(config.conditions) & set(config.val_conditions):
        both = ", ".join(sorted(set(config.conditions) & set(config.val_conditions)))
        raise InputError(f"{both} is both a training and a validation condition; validation must be unseen")
    checks = (
        ("--episodes", config.episodes),
        ("--batch-size", config.batch_size),
        ("--k", config.k),
        ("--val-every", config.val_every),
        ("--val-episodes", config.val_episodes),
        ("--samples", config.samples),
    )
    if config.average_steps < 0:  # None was filled by with_model_defaults
        raise InputError(f"--average-steps {config.average_steps}: use 0 (off) or the steps to average over, e.g. 1000")
    for name, value in checks:
        if value < 1:
            raise InputError(f"{name} {value}: use at least 1")
    if config.learning_rate <= 0 or config.seed < 0:
        raise InputError("--learning-rate must be positive and --seed 0 or more")
    if not 0 <= config.balanced <= 1:
        raise InputError(f"--balanced {config.balanced}: choose the share of balanced training steps in [0, 1]")
    if config.teacher and config.model != "set":
        raise InputError(f"--teacher {config.teacher}: distillation trains a set selector; add --model set")
    if not 0 < config.val_fraction < 1:
        raise InputError(f"val_fraction {config.val_fraction}: hold out a share of patients between 0 and 1, e.g. 0.2")


def _start(
    store: Store, config: SelectorConfig, run_dir: Path, device: torch.device, teacher: torch.nn.Module | None
) -> _Training:
    """Episodes split by patient, the scorer (seeded), Adam and the step decay."""
    train_rows, val_rows = split_patients(store, config.val_fraction, config.seed)
    train = _Episodes(store, config, config.conditions, train_rows, validation=False)
    val = _Episodes(store, config, config.val_conditions, val_rows, validation=True)
    for warning in [*train.warnings, *val.warnings]:
        notify(warning)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        scorer = build_policy(config, store.embeddings.shape[1])
    scorer.to(device)  # before any state is loaded, so the optimizer's state lands on the same device
    optimizer = torch.optim.Adam(scorer.parameters(), lr=config.learning_rate)
    total_steps = max(1, config.episodes // config.batch_size)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, int(total_steps * config.decay_at)), gamma=0.1
    )
    averaged = (
        AveragedModel(scorer, multi_avg_fn=_recent_average(config.average_steps)) if config.average_steps else None
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    return _Training(
        config,
        run_dir,
        scorer,
        optimizer,
        scheduler,
        train,
        val,
        device,
        store.encoder_identity,
        total_steps,
        len(store),
        train_rows,
        averaged,
        teacher,
    )


def _teacher(store: Store, config: SelectorConfig, device: torch.device) -> torch.nn.Module | None:
    """The trained selector ``config.teacher`` names, in eval mode; refused (one line) when it read other inputs than
    this run's pools, or — resuming — when the file is no longer the one the run began with."""
    if not config.teacher:
        return None
    payload, taught = load_selector_checkpoint(config.teacher)
    where = f"--teacher {payload['path']}"
    if payload["encoder_identity"] != store.encoder_identity:
        raise InputError(
            f"{where} was trained on embeddings of {describe_identity(payload['encoder_identity'])}; {store.path} "
            f"holds {describe_identity(store.encoder_identity)}: train the teacher on a store of this encoder"
        )
    if taught.use_metadata != config.use_metadata:
        raise InputError(
            f"{where} was trained {'with' if taught.use_metadata else 'without'} --use-metadata: train the student "
            "the same way"
        )
    digest = file_sha256(Path(payload["path"]))
    if config.teacher_sha256 and digest != config.teacher_sha256:
        raise InputError(
            f"{where} changed since this run began: resume with the file it began with, or start a new run"
        )
    config.teacher_sha256 = digest
    with torch.random.fork_rng(devices=[]):  # building it must not move the seeded generators
        teacher = build_policy(taught, payload["embedding_dim"])
    teacher.load_state_dict(payload["state_dict"])
    return teacher.to(device).eval()


def _train_step(training: _Training, step: int) -> dict:
    """One REINFORCE (or, with a teacher, imitation) step on a batch of episodes of one seen condition; returns its
    metrics row (reward: the picks trained on — the teacher's when distilling)."""
    config, scorer = training.config, training.scorer
    task = training.train.tasks[step % len(training.train.tasks)]
    indices = list(range(step * config.batch_size, (step + 1) * config.batch_size))
    generator = torch.Generator().manual_seed(int(zlib.crc32(f"{config.seed}:{step}".encode())))
    balanced = bool(torch.rand(1, generator=generator).item() < config.balanced) if config.balanced else False
    episodes, pools, _, size = training.train.batch(task, indices, config.seed, balanced=balanced)
    scorer.train()
    pools = torch.from_numpy(pools).to(training.device)
    samples = config.samples if config.model == "set" and training.teacher is None else 1
    if training.teacher is not None:  # distillation: the teacher's picks, made likelier
        picks = torch.from_numpy(policy_picks(training.teacher, pools, config.k)).to(pools.device)
        log_prob = scorer.log_prob(pools, picks)
    elif config.model == "set":
        picks, log_prob = scorer.sample(pools, config.k, samples, generator)
    else:
        logits = scorer(pools).cpu()
        picks = gumbel_top_k(logits, config.k, generator)
        log_prob = plackett_luce_log_prob(logits, picks)
    random_picks = np.stack([torch.randperm(size, generator=generator)[: config.k].numpy() for _ in episodes])
    random_reward = training.train.rewards(episodes, random_picks)
    reward = training.train.rewards([e for e in episodes for _ in range(samples)], picks.cpu().numpy())
    grouped = reward.reshape(len(episodes), samples)
    # each sampled sequence against the mean of the episode's other samples; a lone sample against random picks
    others = (grouped.sum(1, keepdims=True) - grouped) / (samples - 1) if samples > 1 else random_reward[:, None]
    advantage = (grouped - others).reshape(-1)
    if training.teacher is not None:  # mean log-likelihood per pick of the teacher's sequence
        loss = -log_prob.cpu().mean() / config.k
    else:
        loss = -(torch.from_numpy(advantage).float() * log_prob.cpu()).mean()
    training.optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
    training.optimizer.step()
    training.scheduler.step()
    if training.averaged is not None:
        training.averaged.update_parameters(scorer)
    return {
        "step": step + 1,
        "episodes": (step + 1) * config.batch_size,
        "condition": task.condition,
        "reward": float(reward.mean()),
        "baseline": float(random_reward.mean()),
        "loss": float(loss.detach()),
        "learning_rate": training.scheduler.get_last_lr()[0],
    }


def _validate_and_save(training: _Training, state: RunState, random_val: float, started: float) -> dict:
    """Validate, keep the best checkpoint (or the average as it stands), write ``last.pt``; returns the validation
    columns of the metrics row."""
    per_condition = _validate(training.val, training.policy, training.config, training.device)
    mean = float(np.mean(list(per_condition.values())))
    if training.averaged is not None or mean > state.best_val:  # an average is shipped as it stands
        state.best_val, state.best_step = mean, state.step
        _save(training, BEST, {"step": state.step, "val_auroc": mean, "val_random_auroc": random_val})
    _save(
        training,
        LAST,
        {
            "step": state.step,
            "best_val": state.best_val,
            "best_step": state.best_step,
            "seconds": state.seconds + time.perf_counter() - started,
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(),
        }
        | ({"averaged": _on_cpu(training.averaged.state_dict())} if training.averaged is not None else {}),
        module=training.scorer,  # the trained weights, from which a resumed run goes on
    )
    return {f"val_auroc_{c}": v for c, v in per_condition.items()} | {"val_auroc": mean, "val_random_auroc": random_val}


def _mean_val(training: _Training, scorer: torch.nn.Module | None) -> float:
    """Mean validation AUROC over the validation conditions (random picks when ``scorer`` is None)."""
    return float(np.mean(list(_validate(training.val, scorer, training.config, training.device).values())))


def _save(training: _Training, name: str, extra: dict, *, module: torch.nn.Module | None = None) -> None:
    """A checkpoint of ``module`` (default: the policy validation scores) with the run's settings and gate, and
    what the store and split it was trained on were (a resumed run and :func:`recalibrate_gate` check them)."""
    module = training.policy if module is None else module
    trained_on = {"store_rows": training.store_rows, "split_sha256": _split_digest(training.train_rows)}
    save_checkpoint(
        training.run_dir / name,
        scorer=module.cpu(),
        config=training.config,
        identity=training.identity,
        extra=training.gate | trained_on | extra,
    )
    module.to(training.device)


def _recent_average(horizon: int):
    """AveragedModel's update: an exponential moving average with a time constant of ``horizon`` steps (the last
    ``horizon`` carry 63% of it); while a run has fewer than 2 × ``horizon`` steps, each step weighs in proportion
    to its index instead (the later half carries 75%, the initial weights nothing), so a short run's average is
    of its trained weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 / min(horizon, max(1.0, (int(num_averaged) + 1) / 2))
        for mean, value in zip(averaged, current, strict=True):
            mean.lerp_(value, weight)

    return update


def _on_cpu(state: dict) -> dict:
    return {key: value.detach().cpu() for key, value in state.items()}


def _validate(val: _Episodes, scorer, config: SelectorConfig, device) -> dict[str, float]:
    """Mean query AUROC per validation condition over its fixed episodes (deterministic top-k, or random picks
    when ``scorer`` is None)."""
    results = {}
    for task in val.tasks:
        episodes, pools, _, size = val.batch(task, list(range(config.val_episodes)), config.seed + 1)
        if scorer is None:
            rng = np.random.default_rng([config.seed, 99])
            picks = np.stack([rng.permutation(size)[: config.k] for _ in episodes])
        else:
            picks = policy_picks(scorer, torch.from_numpy(pools).to(device), config.k)
        results[task.condition] = float(val.rewards(episodes, picks).mean())
    return results


def _trust_gate(training: _Training, *, clusters: int | None = None) -> dict:
    """The checkpoint entries of the run's trust gate. Its reference is a seeded half of the training images
    (at most ``MAX_REFERENCE`` of them are kept); its threshold the 99th percentile over held-out pools of the
    hospital's other images (:func:`_reference_split`): the validation episodes' pools, with one hospital the pools
    of every condition's episodes among those images (a labelling task's pool holds one finding's positives and its
    negatives, unlike a random draw), and ``GATE_DRAWS`` seeded random draws, as ``select`` draws a pool. Calibrated
    on the validation patients alone, whose labelling pools all held the same few dozen normals, a seed-1 gate fell
    back on 86 of 360 held-out NIH pools (BENCHMARKS.md §13). Its fallback is the heuristic with the best mean AUROC
    on episodes of every condition the run names, seen and unseen, drawn from every patient of the store
    (``heuristics_val``): a heuristic learns nothing, so neither the training patients nor the seen conditions
    favour it, and the validation patients alone are a small population whose pools shrink and reuse the same few
    images. With ``--episodes-within`` every training hospital also gets a reference of its own
    (:func:`_gate_groups`) and the statistic compares a pool with the nearest mixture of the references, so neither
    a smaller hospital nor a blend of hospitals is foreign; the one threshold is then calibrated on every hospital's
    held-out pools too, and each hospital's reference is split into k-means clusters
    (:func:`xsel.trust.calibrate_gate`, ``clusters``), so a labelling pool of one finding is home too. With one
    hospital the reference stays whole by default: there clusters traded quiet at home for firing away
    (BENCHMARKS.md section 13, ``bench/bench_gate_clusters.py``)."""
    config, val = training.config, training.val
    validation_rows = np.setdiff1d(np.arange(len(val.store)), training.train_rows)
    every_row = np.arange(len(val.store))
    referee = _Episodes(val.store, config, [*config.conditions, *config.val_conditions], every_row, validation=True)
    scores = {name: [] for name in FALLBACK_CANDIDATES}
    for task in referee.tasks:
        episodes, _, _, _ = referee.batch(task, list(range(config.val_episodes)), config.seed + 1)
        for name in FALLBACK_CANDIDATES:
            heuristic = create_selector(name)
            picks = np.stack([heuristic.select(val.store.embeddings[e.pool], config.k, seed=e.seed) for e in episodes])
            scores[name].append(float(referee.rewards(episodes, picks).mean()))
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    fallback = max(means, key=means.get)
    pools = []
    for task in val.tasks:
        episodes, _, _, _ = val.batch(task, list(range(config.val_episodes)), config.seed + 1)
        pools += [episode.pool for episode in episodes]
    rng = np.random.default_rng([config.seed, GATE_DRAWS])
    if config.episodes_within:  # one split per hospital, so no held-out row is in any hospital's reference
        splits = _hospital_splits(training, validation_rows)
        reference = np.concatenate([rows for rows, _ in splits.values()])
        held_rows = np.concatenate([rows for _, rows in splits.values()])
    else:
        splits, (reference, held_rows) = {}, _reference_split(training.train_rows, validation_rows, rng)
    size = min(min(map(len, pools)), len(held_rows))
    embeddings = val.store.embeddings
    groups = _gate_groups(training, splits, pools, size) if splits else {}
    draws = [np.sort(rng.choice(held_rows, size, replace=False)) for _ in range(GATE_DRAWS)]
    # with a reference per hospital, each hospital's labelling pools come with its held-out pools (_gate_groups)
    tasks = [] if groups else [pool for pool in _labelling_pools(training, held_rows) if len(pool) >= size]
    held_out = [embeddings[rows] for rows in [*pools, *tasks, *draws]]
    gate = calibrate_gate(
        embeddings[reference], held_out, fallback=fallback, seed=config.seed, groups=groups, clusters=clusters
    )
    notify(
        f"trust gate: heuristics' AUROC on {len(referee.tasks)} conditions of the store's patients "
        + ", ".join(f"{name} {value:.3f}" for name, value in means.items())
        + f"; falls back to {fallback} beyond MMD² {gate.threshold:.4g} to the nearest mixture of "
        + _gate_references(gate)
    )
    return gate_payload(gate) | {"heuristics_val": means}


def _gate_references(gate: TrustGate) -> str:
    """What a gate's nearest mixture is made of, for the user: the training pools, hospitals, clusters."""
    if not gate.groups:
        return "the training pools"
    hospitals = {group.source for group in gate.groups} - {MIXTURE}
    clusters = sum(1 for group in gate.groups if group.of)
    if not hospitals:
        return f"the training pools and {clusters} k-means clusters of them"
    split = f" as {clusters} k-means clusters" if clusters else ""
    return f"the training pools and {len(hospitals)} hospitals{split}"


def _reference_split(
    train_rows: np.ndarray, validation_rows: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A gate's reference, a seeded half of ``train_rows`` (at most ``MAX_REFERENCE``), and the rows its threshold
    is calibrated on: the validation rows and the other training rows. The gate asks where a pool's images come
    from, not whether the selector trained on them, and pools of a few hundred held-out images vary as a new
    patient sample does, where pools of the validation patients alone keep reusing the same images."""
    reference = np.sort(rng.choice(train_rows, min(MAX_REFERENCE, len(train_rows) // 2), replace=False))
    return reference, np.union1d(validation_rows, np.setdiff1d(train_rows, reference))


def _hospital_splits(training: _Training, validation_rows: np.ndarray) -> dict:
    """Per training hospital (each value of ``--episodes-within`` among the training patients), its reference rows
    and held-out rows (:func:`_reference_split` within it, seeded by the hospital's index); the training pools' own
    reference and held-out rows are their unions."""
    config, store = training.config, training.val.store
    values = stratum_values(store.meta, config.episodes_within).to_numpy()
    splits = {}
    for index, value in enumerate(np.unique(values[training.train_rows]), start=1):
        rng = np.random.default_rng([config.seed, GATE_DRAWS, index])  # index 0 would repeat [seed, GATE_DRAWS]
        hospital = values[training.train_rows] == value
        splits[value] = _reference_split(
            training.train_rows[hospital], validation_rows[values[validation_rows] == value], rng
        )
    return splits


def _gate_groups(training: _Training, splits: dict, pools: list[np.ndarray], size: int) -> dict:
    """Per training hospital, for :func:`xsel.trust.calibrate_gate`: its reference rows (``splits``, a seeded half
    of its training images) and held-out pools of its other images, validation and training — the validation
    episodes drawn within it, episodes of every condition it labels and ``GATE_DRAWS`` seeded draws of ``size``. A
    hospital with fewer than twice ``size`` such images is left to the mixture (said so); fewer than two hospitals
    calibrated: no groups, the mixture is the hospital."""
    config, store = training.config, training.val.store
    column = config.episodes_within
    values = stratum_values(store.meta, column).to_numpy()
    groups, skipped = {}, []
    for index, (value, (reference, held_rows)) in enumerate(splits.items(), start=1):
        rng = np.random.default_rng([config.seed, GATE_DRAWS, index, 1])
        if len(reference) < 2 or len(held_rows) < 2 * size:
            skipped.append(f"{value} ({int((values == value).sum())} images)")
            continue
        draws = [np.sort(rng.choice(held_rows, size, replace=False)) for _ in range(GATE_DRAWS)]
        within = [pool for pool in pools if (values[pool] == value).all()]
        tasks = [pool for pool in _labelling_pools(training, held_rows) if len(pool) >= size]
        held_out = [store.embeddings[rows] for rows in [*within, *tasks, *draws]]
        groups[f"{column}={value}"] = (store.embeddings[reference], held_out)
    if skipped and len(groups) > 1:
        notify(
            f"trust gate: too few images for a reference of their own in {column} "
            + ", ".join(skipped)
            + f" (each needs about {4 * size}); their pools are judged against the other hospitals' and the whole"
        )
    return groups if len(groups) > 1 else {}


def _labelling_pools(training: _Training, rows: np.ndarray) -> list[np.ndarray]:
    """The pools of ``val_episodes`` episodes of each of the run's conditions that ``rows`` label enough of."""
    config = training.config
    try:
        episodes = _Episodes(
            training.val.store, config, [*config.conditions, *config.val_conditions], rows, validation=True
        )
    except InputError:  # none of the conditions has enough images among these rows
        return []
    indices = list(range(config.val_episodes))
    return [e.pool for task in episodes.tasks for e in episodes.batch(task, indices, config.seed + 2)[0]]


def policy_picks(scorer: torch.nn.Module, pools: torch.Tensor, k: int) -> np.ndarray:
    """The deterministic picks of either model: MedSelect's top-k of its scores, the set policy's K steps."""
    scorer.eval()
    with torch.no_grad():
        if hasattr(scorer, "sample"):
            return scorer(pools, torch.tensor(k))[1].cpu().numpy()
        return torch.topk(scorer(pools).cpu(), k, dim=1).indices.numpy()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows logged after the last checkpoint (a resumed run logs them again), atomically."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [lines[0], *[line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]]
        write_text_atomic("".join(kept), path)


def _append_metrics(path: Path, row: dict, val_conditions: list[str]) -> None:
    columns = [
        "step",
        "episodes",
        "condition",
        "reward",
        "baseline",
        "loss",
        "learning_rate",
        "val_auroc",
        "val_random_auroc",
        *[f"val_auroc_{c}" for c in val_conditions],
    ]
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({c: row.get(c, "") for c in columns})
