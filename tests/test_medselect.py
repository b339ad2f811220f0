"""The learned selector: sampling maths, learning on a toy problem, resume, checkpoints and the CLI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import QUICK_EVALUATION
from xsel.errors import InputError
from xsel.selection import select
from xsel.store import Store, read_store
from xsel.train.medselect import MedSelectScorer, MedSelectSelector, SelectorConfig, load_checkpoint
from xsel.train.selector import batch_auroc, gumbel_top_k, plackett_luce_log_prob, train_selector


def test_plackett_luce_matches_brute_force_and_gumbel_sampling():
    logits = torch.tensor([[0.3, -1.0, 1.2, 0.0]])
    pairs = list(itertools.permutations(range(4), 2))
    log_probs = plackett_luce_log_prob(logits.expand(len(pairs), 4), torch.tensor(pairs))
    weights = logits[0].exp()
    for (i, j), value in zip(pairs, log_probs, strict=True):
        expected = weights[i] / weights.sum() * weights[j] / (weights.sum() - weights[i])
        assert math.isclose(float(value.exp()), float(expected), rel_tol=1e-5)
    assert math.isclose(float(log_probs.exp().sum()), 1.0, rel_tol=1e-5)
    samples = gumbel_top_k(logits.expand(40_000, 4), 2, torch.Generator().manual_seed(0))
    counts = {pair: 0 for pair in pairs}
    for i, j in samples.tolist():
        counts[(i, j)] += 1
    for pair, value in zip(pairs, log_probs, strict=True):
        assert abs(counts[pair] / 40_000 - float(value.exp())) < 0.01, pair


def test_gradient_reaches_every_parameter():
    scorer = MedSelectScorer(6, hidden=8, use_metadata=True)
    logits = scorer(torch.randn(3, 10, 9))
    picks = gumbel_top_k(logits, 4, torch.Generator().manual_seed(0))
    (-plackett_luce_log_prob(logits, picks).mean()).backward()
    for name, parameter in scorer.named_parameters():
        assert parameter.grad is not None, name
        # a constant added to every logit leaves Plackett–Luce unchanged: the head's bias gets no gradient
        assert name == "head.bias" or parameter.grad.abs().sum() > 0, name


def test_batch_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.tile([1] * 5 + [0] * 7, (4, 1))
    scores = rng.integers(0, 4, size=(4, 12)).astype(float)  # ties included
    expected = [roc_auc_score(labels[i], scores[i]) for i in range(4)]
    assert np.allclose(batch_auroc(labels, scores), expected)


def toy_store(n=400, seed=0) -> Store:
    """Positives are rare (15%); dimension 0 flags them, the other dimensions hold the class signal
    buried in noise. Picking flagged images (balanced labels) is what raises the query AUROC."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.15
    embeddings = rng.normal(size=(n, 8)).astype(np.float32)
    embeddings[:, 1] += np.where(positive, 1.5, -1.5)
    embeddings[:, 0] = np.where(positive, 3.0, 0.0) + 0.1 * rng.normal(size=n)
    meta = pd.DataFrame(
        {
            "PatientID": [f"p{i}" for i in range(n)],
            "A": positive.astype(float),
            "B": positive.astype(float),
            "No Finding": np.where(positive, np.nan, 1.0),
        }
    )
    attrs = {"encoder": "toy", "weights_sha256": "0", "preprocessing": {}}
    return Store(path="toy", embeddings=embeddings, paths=[str(i) for i in range(n)], meta=meta, attrs=attrs)


def toy_config(**changes) -> SelectorConfig:
    settings = dict(
        conditions=["A"],
        val_conditions=["B"],
        k=6,
        pool_size=60,
        query_size=20,
        episodes=16 * 60,
        batch_size=16,
        hidden=16,
        learning_rate=3e-3,
        val_every=20,
        val_episodes=10,
        val_fraction=0.3,
    )
    return SelectorConfig(**(settings | changes))


def test_learns_the_known_best_picks_on_a_toy_problem(tmp_path, monkeypatch):
    store = toy_store()
    result = train_selector(store, tmp_path, toy_config(), show_progress=False)
    assert result.best_val_auroc > result.random_val_auroc + 0.02
    selector = MedSelectSelector(tmp_path / "selector.pt")
    picks = selector.select(store.embeddings[:100], 6, seed=0)
    flagged = store.embeddings[:100, 0] > 1.5
    assert flagged[picks].mean() >= 0.5 > flagged.mean(), "the learned selector prefers the flagged positives"
    import xsel.train.medselect as medselect

    whole = selector.scores(store.embeddings[:100])
    monkeypatch.setattr(medselect, "LARGE_POOL_ROWS", 30)  # a "long" pool: scored chunk by chunk, the same scores
    assert np.allclose(selector.scores(store.embeddings[:100]), whole, atol=1e-5)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert {"step", "reward", "baseline", "val_auroc", "val_auroc_B"} <= set(metrics.columns)


def train_until_interrupted(store, run_dir, config, monkeypatch, *, step: int) -> None:
    """Start a selector run and stop it as Ctrl-C would, once step ``step`` is logged (after its last checkpoint)."""
    import xsel.train.selector as module

    original = module._append_metrics

    def interrupt(path, row, conditions):
        original(path, row, conditions)
        if row["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "_append_metrics", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_selector(store, run_dir, config, show_progress=False)
    monkeypatch.setattr(module, "_append_metrics", original)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    store, config = toy_store(), toy_config(episodes=16 * 10, val_every=5)
    train_selector(store, tmp_path / "straight", config, show_progress=False)
    train_until_interrupted(store, tmp_path / "resumed", config, monkeypatch, step=7)
    with pytest.raises(InputError, match="pass --resume"):
        train_selector(store, tmp_path / "resumed", config, show_progress=False)
    with pytest.raises(InputError, match=r"--k 6 → 5"):
        train_selector(store, tmp_path / "resumed", {"k": 5}, resume=True, show_progress=False)
    train_selector(store, tmp_path / "resumed", None, resume=True, show_progress=False)  # settings as saved
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["state_dict"]
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    steps = pd.read_csv(tmp_path / "resumed" / "metrics.csv")["step"].tolist()
    assert steps == list(range(1, 11)), "metrics rows after the last checkpoint are not duplicated"


def test_resume_refuses_another_store_and_needs_a_run_to_resume(tmp_path):
    config = toy_config(episodes=16 * 5, val_every=5)
    train_selector(toy_store(), tmp_path / "run", config, show_progress=False)
    with pytest.raises(InputError, match="resume on the same store"):
        train_selector(toy_store(n=300), tmp_path / "run", None, resume=True, show_progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        train_selector(toy_store(), tmp_path / "empty", {"k": 5}, resume=True, show_progress=False)
    moved = toy_store()  # the same rows, other patients: another training/validation split
    moved.meta["PatientID"] = [f"q{i}" for i in range(len(moved))]
    with pytest.raises(InputError, match="another split of the patients"):
        train_selector(moved, tmp_path / "run", None, resume=True, show_progress=False)
    with pytest.raises(InputError, match="val_fraction 1"):
        train_selector(toy_store(), tmp_path / "whole", toy_config(val_fraction=1.0), show_progress=False)


def test_a_checkpoint_is_written_even_when_the_budget_ends_first(tmp_path):
    result = train_selector(toy_store(), tmp_path, toy_config(max_minutes=0), show_progress=False)
    assert result.stopped_by == "time budget" and (tmp_path / "selector.pt").is_file()


def test_checkpoint_is_weights_only_and_refuses_another_encoder(tmp_path, demo_store):
    train_selector(toy_store(), tmp_path, toy_config(episodes=32, val_every=1), show_progress=False)
    payload = torch.load(tmp_path / "selector.pt", weights_only=True)
    assert payload["encoder_identity"]["encoder"] == "toy" and payload["config"]["k"] == 6
    with pytest.raises(InputError, match=r"trained on embeddings of toy .* was made by pixels"):
        select(demo_store, 5, checkpoint=tmp_path / "selector.pt")


def test_same_pool_same_scores_and_shuffling_changes_them(tmp_path):
    store = toy_store()
    train_selector(store, tmp_path, toy_config(episodes=16 * 20), show_progress=False)
    selector = MedSelectSelector(tmp_path / "selector.pt")
    pool = store.embeddings[:50]
    assert np.array_equal(selector.scores(pool), selector.scores(pool))
    order = np.random.default_rng(0).permutation(50)
    assert not np.allclose(selector.scores(pool)[order], selector.scores(pool[order]), atol=1e-6)


@pytest.mark.slow
def test_cli_train_select_and_evaluate(demo_store, tmp_path, cli):
    run = tmp_path / "run"
    result = cli(
        "train",
        "selector",
        demo_store,
        "--conditions",
        "Cardiomegaly,Pleural Effusion",
        "--val-conditions",
        "Lung Opacity",
        "--out",
        run,
        "--pool-size",
        "60",
        "--query-size",
        "20",
        "--k",
        "5",
        "--episodes",
        "64",
        "--batch-size",
        "8",
        "--val-every",
        "4",
        "--val-episodes",
        "4",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert "Best step" in result.stdout and "validation AUROC" in result.stdout and (run / "selector.pt").is_file()
    # nanoGPT-style resume: the run folder is enough; a setting typed again must match what was saved
    resumed = cli("train", "selector", demo_store, "--out", run, "--resume", "--episodes", "80", "-q")
    assert resumed.exit_code == 2 and "--episodes 64 → 80" in resumed.stderr, resumed.output
    resumed = cli("train", "selector", demo_store, "--out", run, "--resume", "--max-minutes", "5", "--k", "5", "-q")
    assert resumed.exit_code == 0 and "Trained 8 steps" in resumed.stdout, resumed.output
    fresh = cli("train", "selector", demo_store, "--out", tmp_path / "other", "-q")
    assert fresh.exit_code == 2 and "--conditions is required" in fresh.stderr
    picked = cli("select", demo_store, "--k", "5", "--checkpoint", run / "selector.pt", "--out", tmp_path / "s.csv")
    assert picked.exit_code == 0, picked.output
    table = pd.read_csv(tmp_path / "s.csv")
    assert set(table["selector"]) == {"medselect"} and table["score"].is_monotonic_decreasing
    evaluated = cli(
        "evaluate",
        demo_store,
        "--conditions",
        "Edema",
        "--selectors",
        f"typiclust,medselect={run / 'selector.pt'}",
        "--out",
        tmp_path / "eval",
        *QUICK_EVALUATION,
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "medselect" in set(pd.read_csv(tmp_path / "eval" / "episodes.csv")["selector"])


def test_bad_input(demo_store, tmp_path, cli):
    base = ["--out", str(tmp_path / "run"), "--pool-size", "60", "--query-size", "20", "-q"]
    cases = [
        (["--conditions", "Edema", "--val-conditions", "Edema"], "both a training and a validation condition"),
        (["--conditions", "Oedema", "--val-conditions", "Edema"], "unknown condition 'Oedema'"),
        (["--conditions", "Edema", "--val-conditions", "Nodule", "--episodes", "0"], "--episodes 0: use at least 1"),
    ]
    for args, message in cases:
        result = cli("train", "selector", demo_store, *args, *base)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    missing = cli("select", demo_store, "--k", "3", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "s.csv")
    assert missing.exit_code == 2 and "selector checkpoint not found" in missing.stderr
    spec = cli(
        "evaluate", demo_store, "--conditions", "Edema", "--selectors", "medselect", "--out", tmp_path / "e", "-q"
    )
    assert spec.exit_code == 2 and "medselect=RUN_DIR/selector.pt" in spec.stderr
    assert read_store(demo_store)  # the input store is untouched and readable


@pytest.mark.parametrize("use_metadata", [False, True])
def test_a_long_pool_is_scored_chunk_by_chunk_with_the_same_numbers(use_metadata):
    """Pools above LARGE_POOL_ROWS rows run each LSTM direction chunk by chunk, carrying its state: forward's scores."""
    torch.manual_seed(0)
    scorer = MedSelectScorer(16, hidden=8, use_metadata=use_metadata).eval()
    pool = torch.randn(1, 53, scorer.input_dim)
    with torch.no_grad():
        assert torch.allclose(scorer(pool)[0], scorer.forward_in_chunks(pool[0], chunk=7), atol=1e-5)
        assert not torch.allclose(scorer(pool)[0], scorer(pool.flip(1))[0].flip(0), atol=1e-5), "order matters"
