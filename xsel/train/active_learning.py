"""``xsel evaluate --rounds R`` as a library call: active learning simulated over paired episodes.

Each episode is the one ``xsel evaluate`` draws (same ``EpisodeTask`` pool and query for every strategy,
so differences are paired). Round 0 labels a cold-start pick of K (``cold_start``, default typiclust),
the same K images for every strategy: the curves start at one point and later differences come from the
strategies alone. After every round a linear probe (:func:`xsel.train.head.fit_linear_head`, weighted BCE,
``probe_epochs`` full-batch steps) is fitted on the labelled embeddings with the episode's condition
label and scores the query set: the AUROC after round r is at (r + 1)·K labels. Then, for r = 1..R, each
strategy picks K more from the unlabelled rest of its pool:

- a selector that reads a classifier (uncertainty, boostmis) gets the probe that strategy just fitted,
  in memory — it does not need a ``classifier.pt``;
- every other selector (random, typiclust, kcenter, medselect=…) picks from the unlabelled rest alone,
  exactly what ``xsel select --exclude LABELLED.csv`` does between two labelling rounds; it does not see
  the labelled set (so typiclust may return to clusters that are already labelled).

A labelled set holding one class only (the pool is at most half positive) still gets a probe: the weighted
loss then pushes every score below 0, the query AUROC is whatever that ranking gives, and ``positives``
in ``rounds.csv`` shows it happened. Summaries reuse :func:`xsel.evaluate.summarize`: mean AUROC with 95%
bootstrap CI per strategy × condition × labelled count, and the paired difference to ``random``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from xsel import plugins
from xsel.episodes import NEGATIVE_DEFAULT, EpisodeTask
from xsel.errors import InputError
from xsel.evaluate import BOOTSTRAP_SAMPLES, episode_metrics, parse_selector_specs, summarize, write_tables
from xsel.labels import available_conditions
from xsel.plots import plot_rounds
from xsel.progress import progress_bar
from xsel.selectors import check_identity, create_selector, run_selector, takes_model
from xsel.store import Store, check_finite, read_store
from xsel.train.head import Classifier, fit_linear_head

DEFAULT_STRATEGIES = ("random", "typiclust", "uncertainty", "boostmis")
COLD_START = "typiclust"
PROBE_EPOCHS = 50  # full-batch steps per probe fit: ~10 ms on 80 × 1280 here; AUROC within noise of 200
ROUNDS_COLUMNS = ("episode", "condition", "strategy", "round", "labelled", "auroc", "ap", "f1", "kappa", "positives")


@dataclass
class ActiveLearning:
    """One row per episode × strategy × round (``rounds``), the summary per labelled count, settings, warnings."""

    rounds: pd.DataFrame
    summary: pd.DataFrame
    settings: dict
    warnings: list[str] = field(default_factory=list)


def _strategies(specs: list[str], store: Store) -> dict:
    """Strategy label → a selector instance, or None for one rebuilt each round from that round's probe."""
    strategies = {}
    for label, name, options in parse_selector_specs(specs):
        if takes_model(name):
            if options:
                raise InputError(
                    f"--selectors {label}=…: with --rounds, {label} reads each round's linear probe; drop the file"
                )
            strategies[label] = None
        else:
            strategies[label] = create_selector(name, **options)
            check_identity(strategies[label], label, store)
    return strategies


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int):
    """The round's linear probe: one-label head on the labelled embeddings (1/0 labels)."""
    return fit_linear_head(embeddings, labels.astype(np.float32)[:, None], epochs=epochs, seed=seed)


def probe_logits(head, embeddings: np.ndarray) -> np.ndarray:
    """(M,) float64 logits of a one-label probe; 0 is its natural threshold (p = 0.5)."""
    with torch.inference_mode():
        return head(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))[:, 0].double().numpy()


@contextmanager
def single_threaded() -> Iterator[None]:
    """One thread for torch, BLAS and OpenMP while episodes run: each probe fit and selection is tiny, so extra
    threads only add synchronisation (a 50-step probe fit took 1.6 s with 2 threads on a busy 2-core machine
    here, 14 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


def _round_seed(episode_seed: int, round_: int) -> int:
    return int(np.random.default_rng([episode_seed, round_]).integers(2**31))


def simulate(
    store: str | Path | Store,
    conditions: list[str],
    *,
    rounds: int = 3,
    selectors: list[str] | tuple[str, ...] = DEFAULT_STRATEGIES,
    k: int = 20,
    episodes: int = 50,
    pool_size: int = 1000,
    query_size: int = 100,
    cold_start: str = COLD_START,
    probe_epochs: int = PROBE_EPOCHS,
    negative: str = NEGATIVE_DEFAULT,
    uncertain: str = "positive",
    seed: int = 0,
    allow_same_patient: bool = False,
    show_progress: bool = True,
) -> ActiveLearning:
    """Run ``episodes`` episodes per condition: a shared cold start of ``k``, then ``rounds`` rounds of ``k`` more
    per strategy, the probe's query AUROC after each; ``random`` is always included as the reference."""
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    if not conditions:
        raise InputError(
            f"--conditions is empty; label columns in this store: {', '.join(available_conditions(store.meta))}"
        )
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: run at least 1 round after the cold start")
    if k < 1:
        raise InputError(f"--k {k}: every round labels at least 1 image")
    if episodes < 1:
        raise InputError(f"--episodes {episodes}: run at least 1")
    if probe_epochs < 1:
        raise InputError(f"--probe-epochs {probe_epochs}: fit the probe for at least 1 step")
    cold_name = plugins.get("selector", cold_start).name
    if takes_model(cold_name):
        raise InputError(f"cold start {cold_name!r} needs a classifier; start with a label-blind selector")
    starter = create_selector(cold_name)
    check_identity(starter, cold_name, store)
    strategies = _strategies(list(selectors), store)
    total = (rounds + 1) * k
    tasks = [
        EpisodeTask(
            store,
            condition,
            negative=negative,
            uncertain=uncertain,
            pool_size=pool_size,
            query_size=query_size,
            k=k,
            allow_same_patient=allow_same_patient,
        )
        for condition in conditions
    ]
    for task in tasks:
        if task.pool_size < total:
            raise InputError(
                f"condition {task.condition!r}: pools hold {task.pool_size} images, fewer than the {total} that a "
                f"cold start and {rounds} rounds of K={k} label; lower --rounds or --k, or raise --pool-size"
            )
    rows = []
    bar = progress_bar("Active learning", total=len(tasks) * episodes, unit="episodes", show=show_progress)
    with bar as advance, single_threaded():
        for task in tasks:
            for index in range(episodes):
                episode = task.episode(index, seed)
                rows += _run_episode(
                    store, task, episode, index, starter, cold_name, strategies, rounds, k, probe_epochs
                )
                advance(1)
    table = pd.DataFrame(rows, columns=[*ROUNDS_COLUMNS, "pool_size", "pool_positives", "query_size"])
    settings = {
        "store": str(store.path),
        "encoder": store.attrs.get("encoder"),
        "conditions": list(conditions),
        "strategies": list(strategies),
        "rounds": rounds,
        "k": k,
        "labelled": [(r + 1) * k for r in range(rounds + 1)],
        "cold_start": cold_name,
        "probe": f"linear probe, weighted BCE, {probe_epochs} full-batch AdamW steps",
        "episodes_per_condition": episodes,
        "pool_size": pool_size,
        "query_size": query_size,
        "negative": negative,
        "uncertain": uncertain,
        "seed": seed,
        "allow_same_patient": allow_same_patient,
        "bootstrap_samples": BOOTSTRAP_SAMPLES,
    }
    return ActiveLearning(
        rounds=table,
        summary=summarize_rounds(table, k=k, seed=seed),
        settings=settings,
        warnings=[t.warning for t in tasks if t.warning],
    )


def _run_episode(store, task, episode, index, starter, cold_name, strategies, rounds, k, probe_epochs) -> list[dict]:
    """Every strategy's rounds on one episode; round 0 (the cold start) is computed once and shared."""
    pool_embeddings = store.embeddings[episode.pool]
    query_embeddings = store.embeddings[episode.query]
    metadata = store.meta.iloc[episode.pool].reset_index(drop=True).assign(label=episode.pool_labels)
    common = {
        "episode": index,
        "condition": task.condition,
        "pool_size": len(episode.pool),
        "pool_positives": int(episode.pool_labels.sum()),
        "query_size": len(episode.query),
    }

    def choose(selector, name, labelled, seed):
        """``labelled`` plus the selector's K picks from the rest of the pool (labels only for uses_labels)."""
        rest = np.setdiff1d(np.arange(len(episode.pool)), labelled)
        seen = (
            metadata.iloc[rest]
            if getattr(selector, "uses_labels", False)
            else metadata.iloc[rest].drop(columns="label")
        )
        picks = run_selector(selector, name, pool_embeddings[rest], k, seed=seed, metadata=seen)
        return np.concatenate([labelled, rest[picks]])

    def fit_and_score(labelled, seed):
        head = fit_probe(pool_embeddings[labelled], episode.pool_labels[labelled], epochs=probe_epochs, seed=seed)
        metrics = episode_metrics(episode.query_labels, probe_logits(head, query_embeddings))
        return head, {**metrics, "positives": int(episode.pool_labels[labelled].sum())}

    start = choose(starter, cold_name, np.zeros(0, dtype=np.int64), _round_seed(episode.seed, 0))
    start_head, start_metrics = fit_and_score(start, _round_seed(episode.seed, 0))
    rows = []
    for strategy, selector in strategies.items():
        labelled, head, metrics = start, start_head, start_metrics
        for round_ in range(rounds + 1):
            if round_ > 0:
                seed = _round_seed(episode.seed, round_)
                if selector is None:
                    probe = Classifier(
                        path=Path(f"linear probe ({task.condition}, round {round_ - 1})"),
                        labels=[task.condition],
                        head=head,
                        encoder_identity=store.encoder_identity,
                        thresholds=[0.5],
                    )
                    chooser = create_selector(strategy, model=probe)
                else:
                    chooser = selector
                labelled = choose(chooser, strategy, labelled, seed)
                head, metrics = fit_and_score(labelled, seed)
            rows.append({**common, "strategy": strategy, "round": round_, "labelled": len(labelled), **metrics})
    return rows


def summarize_rounds(table: pd.DataFrame, *, k: int, seed: int = 0) -> pd.DataFrame:
    """:func:`xsel.evaluate.summarize` per labelled count: strategy × condition × round, paired to random."""
    summary = summarize(table.rename(columns={"strategy": "selector", "labelled": "k"}), seed=seed)
    summary = summary.rename(columns={"selector": "strategy", "k": "labelled"})
    summary.insert(2, "round", summary["labelled"] // k - 1)
    return summary


def write_rounds_report(result: ActiveLearning, out_dir: str | Path) -> list[Path]:
    """rounds.csv, rounds_summary.csv, rounds_summary.json and rounds.png, each atomic."""
    out_dir = Path(out_dir)
    written = write_tables(out_dir, result.rounds, result, rows_name="rounds", summary_name="rounds_summary")
    written.append(plot_rounds(result.summary, out_dir / "rounds.png"))
    return written
