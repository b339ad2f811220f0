"""``xsel evaluate`` as a library call: selectors compared over paired labeling episodes.

Every selector sees the same episodes (same pool, same query), so differences are paired. The score
of an episode is the query AUROC of a few-shot classifier fitted on the K picks and their labels.
Summaries give, per selector × condition × K, the mean with a 95% percentile bootstrap CI over
episodes, and the paired difference to ``random`` with its CI and win rate; the overall row averages
conditions and bootstraps within each condition (scarce conditions reuse images across episodes).

Two protocols. ``conditions`` (default): one episode family per condition, positives against the
negative class (:class:`xsel.episodes.EpisodeTask`). ``archive``: random draws of the whole store, the
picks labelled for every condition (:class:`xsel.episodes.ArchiveTask`), scored as the mean query
AUROC over conditions; its rows carry condition ``archive`` so the same summaries apply.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from xsel import plugins
from xsel.episodes import (
    ARCHIVE,
    NEGATIVE_DEFAULT,
    ArchiveEpisode,
    ArchiveTask,
    EpisodeTask,
    check_episodes_within,
    rows_of_labelling_groups,
)
from xsel.errors import InputError
from xsel.geometry import unit_rows
from xsel.io.atomic import write_text_atomic
from xsel.io.table import write_csv_atomic
from xsel.labels import available_conditions
from xsel.progress import progress_bar
from xsel.selectors import check_identity, create_selector, gated, parse_selector_spec, run_selector
from xsel.store import Store, check_finite, read_store
from xsel.trust import KEEP_LEARNED

REFERENCE = "random"
DEFAULT_SELECTORS = ("random", "kmedoids", "kcenter", "typiclust", "probcover", "oracle-balanced")
BOOTSTRAP_SAMPLES = 2000
OVERALL = "all"
PROTOCOLS = ("conditions", ARCHIVE)
SCORES = {"auroc": "", "probe_auroc": "probe_"}  # score column of the episode table → prefix of its summary columns
PROBE_SEED = 0


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
    conditions: list[str] | None = None,
    *,
    protocol: str = "conditions",
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
    episodes_within: str = "",
    show_progress: bool = True,
    trust_gate: bool = True,
) -> Evaluation:
    """Run ``episodes`` episodes per condition for every selector and K; ``random`` is always included.

    ``trust_gate``: a selector carrying a trust gate (:mod:`xsel.trust`) hands each pool unlike its training pools to
    its fallback heuristic, as ``xsel select`` would; its rows get ``fell_back``, ``trust_fired`` and
    ``trust_statistic`` columns and a warning counts the fallbacks per condition.

    ``episodes_within``: a column naming each image's hospital (e.g. ``Source``); a condition's episodes then draw
    only from the hospitals with positives for it, not from every hospital's normals.

    ``protocol="archive"``: ``episodes`` archive episodes in all, scored over ``conditions`` (default:
    every label column with 2 positives and 2 negatives); ``negative`` does not apply. Selectors that use labels
    (oracle-balanced) see the first condition's: an oracle balances one condition, the one listed first.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    store = store if isinstance(store, Store) else read_store(store)
    check_finite(store)
    if protocol != ARCHIVE and not conditions:
        missing = "--conditions is empty" if conditions is not None else "give --conditions (or --protocol archive)"
        raise InputError(f"{missing}; label columns in this store: {', '.join(available_conditions(store.meta))}")
    if any(value < 1 for value in k):
        raise InputError(f"--k {','.join(map(str, k))}: every K must be at least 1")
    if episodes < 1:
        raise InputError(f"--episodes {episodes}: run at least 1")
    check_episodes_within(store, episodes_within)
    if episodes_within and protocol == ARCHIVE:
        raise InputError("--episodes-within applies to conditions' episodes; archive pools draw from every hospital")
    instances = _create_selectors(list(selectors), store)
    names = list(instances)
    classifier_factory = plugins.get("classifier", classifier).factory
    if protocol == ARCHIVE:
        task = ArchiveTask(
            store,
            conditions,
            uncertain=uncertain,
            pool_size=pool_size,
            query_size=query_size,
            k=max(k),
            allow_same_patient=allow_same_patient,
        )
        rows, notes = _archive_rows(
            task, store, instances, classifier_factory, k, episodes, seed, show_progress, trust_gate=trust_gate
        )
        conditions = list(task.conditions)
    else:
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
                rows=rows_of_labelling_groups(store, condition, episodes_within, uncertain=uncertain)
                if episodes_within
                else None,
            )
            for condition in conditions
        ]
        rows = _condition_rows(
            tasks, store, instances, classifier_factory, k, episodes, seed, show_progress, trust_gate=trust_gate
        )
        notes = [t.warning for t in tasks if t.warning]
    table = pd.DataFrame(rows)
    settings = {
        "store": str(store.path),
        "encoder": store.attrs.get("encoder"),
        "protocol": protocol,
        "conditions": list(conditions),
        "selectors": names,
        "k": list(k),
        "episodes_per_condition": episodes,
        "pool_size": pool_size,
        "query_size": query_size,
        "classifier": plugins.get("classifier", classifier).name,
        "negative": None if protocol == ARCHIVE else negative,
        "uncertain": uncertain,
        "seed": seed,
        "allow_same_patient": allow_same_patient,
        "episodes_within": episodes_within or None,
        "bootstrap_samples": BOOTSTRAP_SAMPLES,
        "trust_gate": trust_gate,
    }
    fallbacks = _fallback_counts(table, instances)
    if fallbacks:
        settings["fell_back"] = fallbacks
        notes = notes + _fallback_warnings(fallbacks, instances)
    return Evaluation(episodes=table, summary=summarize(table, seed=seed), settings=settings, warnings=notes)


def _gated(selector, name: str, pool_embeddings: np.ndarray, seed: int, trust_gate: bool):
    """The selector that picks this episode (its trust gate's fallback when the pool is unlike its training pools),
    its name, and the columns its rows get when a gate was checked: ``fell_back``, ``trust_fired``,
    ``trust_statistic``."""
    runner, run_name, verdict = gated(selector, name, pool_embeddings, seed=seed, use_gate=trust_gate)
    columns = (
        {}
        if verdict is None
        else {
            "fell_back": verdict.fell_back,
            "trust_fired": verdict.fired,
            "trust_statistic": verdict.statistic,
        }
    )
    return runner, run_name, columns


def _fallback_counts(table: pd.DataFrame, instances: dict) -> dict:
    """Per gated selector and condition: in how many episodes its trust gate fired (the pool unlike its training
    pools) and handed the pool to the fallback (not when the fallback is the learned selector itself)."""
    if "fell_back" not in table.columns:
        return {}
    counts = {}
    for name in instances:
        mine = table[(table["selector"] == name) & table["fell_back"].notna()].drop_duplicates(["condition", "episode"])
        for condition, rows in mine.groupby("condition", sort=False):
            counts.setdefault(name, {})[condition] = {
                "fired": int(rows["trust_fired"].astype(bool).sum()),
                "fell_back": int(rows["fell_back"].astype(bool).sum()),
                "episodes": len(rows),
            }
    return counts


def _fallback_warnings(counts: dict, instances: dict) -> list[str]:
    """One line per gated selector: how often its trust gate fell back (or, keeping the learned selector, fired)."""
    lines = []
    for name, per_condition in counts.items():
        fallback = instances[name].trust_gate.fallback
        if fallback == KEEP_LEARNED:
            lines.append(
                f"trust gate of {name}: pools unlike its training pools in "
                + ", ".join(f"{n['fired']}/{n['episodes']} episodes of {c}" for c, n in per_condition.items())
                + "; its fallback is the learned selector itself (chosen on another hospital), so it kept picking"
            )
        else:
            lines.append(
                f"trust gate of {name}: fell back to {fallback} in "
                + ", ".join(f"{n['fell_back']}/{n['episodes']} episodes of {c}" for c, n in per_condition.items())
                + " (--no-trust-gate always runs the learned selector)"
            )
    return lines


def _condition_rows(
    tasks: list[EpisodeTask], store, instances, classifier_factory, k, episodes, seed, show_progress, *, trust_gate
):
    """One row per condition × episode × selector × K: the classifier fitted on the picks scores the query."""
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
                    runner, run_name, gate = _gated(selector, name, pool_embeddings, episode.seed, trust_gate)
                    for budget in k:
                        picks = run_selector(
                            runner, run_name, pool_embeddings, budget, seed=episode.seed, metadata=selector_metadata
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
                                **gate,
                            }
                        )
                advance(1)
    return rows


def probe_scores(picks: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """One condition's probe: a class-balanced logistic regression on the picks' unit embeddings scores
    the query. Picks of one class (or none) leave nothing to fit, so it scores a constant (AUROC 0.5)."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(labels)) < 2:
        return np.zeros(len(query))
    model = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=PROBE_SEED)
    return model.fit(unit_rows(picks), labels).decision_function(unit_rows(query))


def scored_conditions(query_labels: np.ndarray) -> list[int]:
    """Columns of an archive query (1/0/NaN) holding a positive and a negative: the conditions it can score."""
    return [j for j in range(query_labels.shape[1]) if {0.0, 1.0} <= set(query_labels[:, j].tolist())]


def archive_scores(
    episode: ArchiveEpisode, picks: np.ndarray, pool_embeddings, query_embeddings, classifier_factory, scored
) -> dict:
    """Mean over the ``scored`` conditions of the classifier's metrics and of the probe's AUROC, each fitted
    on the picks with a known label for that condition and scored on the query images with one."""
    from sklearn.metrics import roc_auc_score

    metrics, probe, positives, pool_positives = [], [], 0, 0
    for j in scored:
        query_known = ~np.isnan(episode.query_labels[:, j])
        pick_labels = episode.pool_labels[picks, j]
        pick_known = ~np.isnan(pick_labels)
        truth = episode.query_labels[query_known, j].astype(np.int8)
        labels = pick_labels[pick_known].astype(np.int8)
        train, query = pool_embeddings[picks][pick_known], query_embeddings[query_known]
        if len(labels):  # a classifier needs at least one labelled pick; none scores a constant
            scores = np.asarray(classifier_factory().fit(train, labels).decision_function(query), dtype=np.float64)
        else:
            scores = np.zeros(len(query))
        metrics.append(episode_metrics(truth, scores))
        probe.append(roc_auc_score(truth, probe_scores(train, labels, query)))
        positives += int(labels.sum())
        pool_positives += int((episode.pool_labels[:, j] == 1).sum())
    return {
        **{name: float(np.mean([m[name] for m in metrics])) for name in metrics[0]},
        "probe_auroc": float(np.mean(probe)),
        "conditions_scored": len(scored),
        "positives_picked": positives,
        "pool_positives": pool_positives,
    }


def _archive_rows(
    task: ArchiveTask, store, instances, classifier_factory, k, episodes, seed, show_progress, *, trust_gate
):
    """One row per archive episode × selector × K (condition ``archive``), and the warnings to show.

    An episode whose query scores no condition is left out for every selector, so rows stay paired."""
    rows, skipped, ever_scored = [], 0, set()
    with progress_bar("Evaluating", total=episodes, unit="episodes", show=show_progress) as advance:
        for index in range(episodes):
            episode = task.episode(index, seed)
            scored = scored_conditions(episode.query_labels)
            ever_scored.update(scored)
            if not scored:
                skipped += 1
                advance(1)
                continue
            pool_embeddings = store.embeddings[episode.pool]
            query_embeddings = store.embeddings[episode.query]
            metadata = store.meta.iloc[episode.pool].reset_index(drop=True)
            oracle_labels = (episode.pool_labels[:, 0] == 1).astype(np.int8)  # the first condition's
            for name, selector in instances.items():
                selector_metadata = metadata.assign(label=oracle_labels) if selector.uses_labels else metadata
                runner, run_name, gate = _gated(selector, name, pool_embeddings, episode.seed, trust_gate)
                for budget in k:
                    picks = run_selector(
                        runner, run_name, pool_embeddings, budget, seed=episode.seed, metadata=selector_metadata
                    )
                    rows.append(
                        {
                            "episode": index,
                            "condition": ARCHIVE,
                            "selector": name,
                            "k": budget,
                            **archive_scores(
                                episode, picks, pool_embeddings, query_embeddings, classifier_factory, scored
                            ),
                            "pool_size": len(episode.pool),
                            "query_size": len(episode.query),
                            **gate,
                        }
                    )
            advance(1)
    if skipped == episodes:
        raise InputError(
            f"no archive episode's query of {task.query_size} held a positive and a negative of any condition; "
            "raise --query-size"
        )
    notes = [task.warning] if task.warning else []
    if skipped:
        notes.append(
            f"{ARCHIVE}: {skipped} of {episodes} episodes had no condition with both classes in the query and were "
            "left out"
        )
    never = [c for j, c in enumerate(task.conditions) if j not in ever_scored]
    if never:
        notes.append(
            f"{ARCHIVE}: {', '.join(never)} never had a positive and a negative (known labels) in a query, so "
            "never scored"
        )
    return rows, notes


def _bootstrap_means(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of the mean over groups of each group's mean, resampling within groups."""
    total = np.zeros(BOOTSTRAP_SAMPLES)
    for values in groups:
        draws = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
        total += values[draws].mean(axis=1)
    return total / len(groups)


def _paired_statistics(mine: list, theirs: list, column: str, rng: np.random.Generator, state: dict) -> dict:
    """Mean of ``column`` with its 95% CI, and the paired difference to random with its CI and win rate.
    Each bootstrap restarts the generator from ``state``: every score resamples the same episodes."""
    values = [m[column].to_numpy() for m in mine]
    differences = [m[column].to_numpy() - t[column].to_numpy() for m, t in zip(mine, theirs, strict=True)]
    rng.bit_generator.state = state
    boot = _bootstrap_means(values, rng)
    rng.bit_generator.state = state
    boot_diff = _bootstrap_means(differences, rng)
    all_diff = np.concatenate(differences)
    return {
        "auroc": float(np.mean([v.mean() for v in values])),
        "auroc_low": float(np.quantile(boot, 0.025)),
        "auroc_high": float(np.quantile(boot, 0.975)),
        "diff_vs_random": float(np.mean([d.mean() for d in differences])),
        "diff_low": float(np.quantile(boot_diff, 0.025)),
        "diff_high": float(np.quantile(boot_diff, 0.975)),
        "win_rate": float(((all_diff > 0) + 0.5 * (all_diff == 0)).mean()),
    }


def paired_margins(tables: list[pd.DataFrame], against: str, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Every other selector's paired Δ AUROC against ``against`` in episode tables of one K (:class:`Evaluation`
    ``episodes``), with its 95% bootstrap CI: the mean over the tables (e.g. held-out hospitals, each weighing the
    same) of the mean over their conditions, resampling each condition's episodes. Says whether the episodes that
    ranked ``against`` first decided it, or left a runner-up within their noise."""
    if any(table["k"].nunique() != 1 for table in tables):
        raise ValueError("paired_margins pairs episodes of one K: split the tables by K first")
    names = [name for name in dict.fromkeys(tables[0]["selector"]) if name != against]
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    margins = {}
    for name in names:
        rng.bit_generator.state = state  # every candidate resamples the same episodes
        means, boots = [], []
        for table in tables:
            differences = []
            for condition in dict.fromkeys(table["condition"]):
                rows = table[table["condition"] == condition]
                mine, theirs = (rows[rows["selector"] == s].sort_values("episode")["auroc"] for s in (name, against))
                differences.append(mine.to_numpy() - theirs.to_numpy())
            means.append(np.mean([d.mean() for d in differences]))
            boots.append(_bootstrap_means(differences, rng))
        boot = np.mean(boots, axis=0)
        margins[name] = {
            "diff": float(np.mean(means)),
            "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)),
        }
    return margins


def summarize(table: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Mean AUROC with 95% CI per selector × condition × K (and over all conditions), paired to random.

    A ``probe_auroc`` column (archive episodes) gets the same statistics as ``probe_``-prefixed columns."""
    rows = []
    conditions = list(dict.fromkeys(table["condition"]))
    for (selector, budget), group in table.groupby(["selector", "k"], sort=False):
        reference = table[(table["selector"] == REFERENCE) & (table["k"] == budget)]
        for condition in [*conditions, OVERALL]:
            scope = conditions if condition == OVERALL else [condition]
            mine = [group[group["condition"] == c].sort_values("episode") for c in scope]
            theirs = [reference[reference["condition"] == c].sort_values("episode") for c in scope]
            # the same resampled episodes for every score and its difference: paired statistics
            rng = np.random.default_rng([seed, budget, len(rows)])
            state = rng.bit_generator.state
            row = {"selector": selector, "condition": condition, "k": budget, "episodes": sum(len(m) for m in mine)}
            row.update(_paired_statistics(mine, theirs, "auroc", rng, state))
            row.update({name: float(np.mean([m[name].mean() for m in mine])) for name in ("ap", "f1", "kappa")})
            for column, prefix in SCORES.items():
                if prefix and column in table.columns:
                    statistics = _paired_statistics(mine, theirs, column, rng, state)
                    row.update({f"{prefix}{name}": value for name, value in statistics.items()})
            rows.append(row)
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
