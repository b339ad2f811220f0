"""``xsel evaluate`` as a library call: selectors compared over paired labeling episodes.

Every selector sees the same episodes (same pool, same query), so differences are paired. The score
of an episode is the query AUROC of a few-shot classifier fitted on the K picks and their labels.
Summaries give, per selector × condition × K, the mean with a 95% percentile bootstrap CI over
episodes, and the paired difference to ``random`` with its CI and win rate; the overall row averages
conditions and bootstraps within each condition (scarce conditions reuse images across episodes).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import plugins
from xsel.episodes import NEGATIVE_DEFAULT, EpisodeTask
from xsel.errors import InputError
from xsel.io.atomic import write_text_atomic
from xsel.io.table import write_csv_atomic
from xsel.labels import available_conditions
from xsel.progress import progress_bar
from xsel.selectors import check_identity, create_selector, parse_selector_spec, run_selector
from xsel.store import Store, check_finite, read_store

REFERENCE = "random"
DEFAULT_SELECTORS = ("random", "kmedoids", "kcenter", "typiclust", "probcover", "oracle-balanced")
BOOTSTRAP_SAMPLES = 2000
OVERALL = "all"


@dataclass
class Evaluation:
    """Per-episode scores, the summary table, the settings used and the warnings to show."""

    episodes: pd.DataFrame
    summary: pd.DataFrame
    settings: dict
    warnings: list[str] = field(default_factory=list)


def episode_metrics(query_labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and AP of the scores; F1 and Cohen's kappa at the classifier's natural threshold (0)."""
    from sklearn.metrics import average_precision_score, cohen_kappa_score, f1_score, roc_auc_score

    predicted = (scores > 0).astype(int)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(query_labels, predicted)
    return {
        "auroc": roc_auc_score(query_labels, scores),
        "ap": average_precision_score(query_labels, scores),
        "f1": f1_score(query_labels, predicted, zero_division=0.0),
        "kappa": 0.0 if np.isnan(kappa) else float(kappa),
    }


def parse_selector_specs(specs: list[str]) -> list[tuple[str, str, dict]]:
    """``--selectors`` → (label, registered name, factory options) each, ``random`` (the reference) first."""
    parsed = [parse_selector_spec(spec) for spec in specs]
    if REFERENCE not in [label for label, _, _ in parsed]:
        parsed.insert(0, (REFERENCE, REFERENCE, {}))
    labels = [label for label, _, _ in parsed]
    if len(set(labels)) != len(labels):
        raise InputError(f"--selectors lists a selector twice: {', '.join(specs)}")
    return parsed


def _create_selectors(specs: list[str], store: Store) -> dict:
    """Label → selector instance, ``random`` first; ``NAME=CHECKPOINT`` specs load learned selectors."""
    instances = {}
    for label, name, options in parse_selector_specs(specs):
        instances[label] = create_selector(name, **options)
        check_identity(instances[label], label, store)
    return instances


def evaluate(
    store: str | Path | Store,
    conditions: list[str],
    *,
    selectors: list[str] | tuple[str, ...] = DEFAULT_SELECTORS,
    k: list[int] | tuple[int, ...] = (20,),
    episodes: int = 200,
    pool_size: int = 1000,
    query_size: int = 100,
    classifier: str = "cosine",
    negative: str = NEGATIVE_DEFAULT,
    uncertain: str = "positive",
    seed: int = 0,
    allow_same_patient: bool = False,
    show_progress: bool = True,
) -> Evaluation:
    """Run ``episodes`` episodes per condition for every selector and K; ``random`` is always included."""
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    if not conditions:
        raise InputError(
            f"--conditions is empty; label columns in this store: {', '.join(available_conditions(store.meta))}"
        )
    if any(value < 1 for value in k):
        raise InputError(f"--k {','.join(map(str, k))}: every K must be at least 1")
    if episodes < 1:
        raise InputError(f"--episodes {episodes}: run at least 1")
    instances = _create_selectors(list(selectors), store)
    names = list(instances)
    classifier_factory = plugins.get("classifier", classifier).factory
    tasks = [
        EpisodeTask(
            store,
            condition,
            negative=negative,
            uncertain=uncertain,
            pool_size=pool_size,
            query_size=query_size,
            k=max(k),
            allow_same_patient=allow_same_patient,
        )
        for condition in conditions
    ]
    rows = []
    with progress_bar("Evaluating", total=len(tasks) * episodes, unit="episodes", show=show_progress) as advance:
        for task in tasks:
            for index in range(episodes):
                episode = task.episode(index, seed)
                pool_embeddings = store.embeddings[episode.pool]
                query_embeddings = store.embeddings[episode.query]
                metadata = store.meta.iloc[episode.pool].reset_index(drop=True)
                for name, selector in instances.items():
                    selector_metadata = metadata.assign(label=episode.pool_labels) if selector.uses_labels else metadata
                    for budget in k:
                        picks = run_selector(
                            selector, name, pool_embeddings, budget, seed=episode.seed, metadata=selector_metadata
                        )
                        model = classifier_factory().fit(pool_embeddings[picks], episode.pool_labels[picks])
                        scores = np.asarray(model.decision_function(query_embeddings), dtype=np.float64)
                        rows.append(
                            {
                                "episode": index,
                                "condition": task.condition,
                                "selector": name,
                                "k": budget,
                                **episode_metrics(episode.query_labels, scores),
                                "positives_picked": int(episode.pool_labels[picks].sum()),
                                "pool_size": len(episode.pool),
                                "pool_positives": int(episode.pool_labels.sum()),
                                "query_size": len(episode.query),
                            }
                        )
                advance(1)
    table = pd.DataFrame(rows)
    settings = {
        "store": str(store.path),
        "encoder": store.attrs.get("encoder"),
        "conditions": list(conditions),
        "selectors": names,
        "k": list(k),
        "episodes_per_condition": episodes,
        "pool_size": pool_size,
        "query_size": query_size,
        "classifier": plugins.get("classifier", classifier).name,
        "negative": negative,
        "uncertain": uncertain,
        "seed": seed,
        "allow_same_patient": allow_same_patient,
        "bootstrap_samples": BOOTSTRAP_SAMPLES,
    }
    return Evaluation(
        episodes=table,
        summary=summarize(table, seed=seed),
        settings=settings,
        warnings=[t.warning for t in tasks if t.warning],
    )


def _bootstrap_means(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of the mean over groups of each group's mean, resampling within groups."""
    total = np.zeros(BOOTSTRAP_SAMPLES)
    for values in groups:
        draws = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
        total += values[draws].mean(axis=1)
    return total / len(groups)


def summarize(table: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Mean AUROC with 95% CI per selector × condition × K (and over all conditions), paired to random."""
    rows = []
    conditions = list(dict.fromkeys(table["condition"]))
    for (selector, budget), group in table.groupby(["selector", "k"], sort=False):
        reference = table[(table["selector"] == REFERENCE) & (table["k"] == budget)]
        for condition in [*conditions, OVERALL]:
            scope = conditions if condition == OVERALL else [condition]
            mine = [group[group["condition"] == c].sort_values("episode") for c in scope]
            theirs = [reference[reference["condition"] == c].sort_values("episode") for c in scope]
            auroc = [m["auroc"].to_numpy() for m in mine]
            differences = [m["auroc"].to_numpy() - t["auroc"].to_numpy() for m, t in zip(mine, theirs, strict=True)]
            # the same resampled episodes for the score and its difference: paired statistics
            rng = np.random.default_rng([seed, budget, len(rows)])
            state = rng.bit_generator.state
            boot = _bootstrap_means(auroc, rng)
            rng.bit_generator.state = state
            boot_diff = _bootstrap_means(differences, rng)
            all_diff = np.concatenate(differences)
            rows.append(
                {
                    "selector": selector,
                    "condition": condition,
                    "k": budget,
                    "episodes": int(sum(len(a) for a in auroc)),
                    "auroc": float(np.mean([a.mean() for a in auroc])),
                    "auroc_low": float(np.quantile(boot, 0.025)),
                    "auroc_high": float(np.quantile(boot, 0.975)),
                    "diff_vs_random": float(np.mean([d.mean() for d in differences])),
                    "diff_low": float(np.quantile(boot_diff, 0.025)),
                    "diff_high": float(np.quantile(boot_diff, 0.975)),
                    "win_rate": float(((all_diff > 0) + 0.5 * (all_diff == 0)).mean()),
                    "ap": float(np.mean([m["ap"].mean() for m in mine])),
                    "f1": float(np.mean([m["f1"].mean() for m in mine])),
                    "kappa": float(np.mean([m["kappa"].mean() for m in mine])),
                }
            )
    return pd.DataFrame(rows)


def write_tables(out_dir: str | Path, rows: pd.DataFrame, result, *, rows_name: str, summary_name: str) -> list[Path]:
    """The table part of a report, each file atomic: ``rows_name``.csv (one row per episode), and
    ``summary_name``.csv/.json (the JSON adds the run's settings and warnings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"settings": result.settings, "warnings": result.warnings, "summary": result.summary.to_dict("records")}
    return [
        write_csv_atomic(rows, out_dir / f"{rows_name}.csv"),
        write_csv_atomic(result.summary, out_dir / f"{summary_name}.csv"),
        write_text_atomic(json.dumps(payload, indent=2), out_dir / f"{summary_name}.json"),
    ]


def write_report(result: Evaluation, out_dir: str | Path) -> list[Path]:
    """episodes.csv, summary.csv, summary.json and (with matplotlib) auroc.png / auroc_vs_k.png."""
    out_dir = Path(out_dir)
    written = write_tables(out_dir, result.episodes, result, rows_name="episodes", summary_name="summary")
    try:
        from xsel.plots import plot_auroc, plot_label_efficiency
    except ImportError:  # matplotlib is part of the `train` extra; a site install has no plots
        return written
    written.append(plot_auroc(result.summary, out_dir / "auroc.png"))
    if result.summary["k"].nunique() > 1:
        written.append(plot_label_efficiency(result.summary, out_dir / "auroc_vs_k.png"))
    return written
