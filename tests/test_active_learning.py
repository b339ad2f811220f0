"""Active learning: `xsel select --model` (uncertainty, boostmis) and `xsel evaluate --rounds`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from xsel.errors import InputError
from xsel.labels import condition_labels
from xsel.selection import select
from xsel.store import read_store
from xsel.train.active_learning import ROUNDS_COLUMNS, simulate, write_rounds_report
from xsel.train.head import fit_linear_head, save_classifier

LABELS = ["Cardiomegaly", "Edema"]
SMALL = {"episodes": 2, "pool_size": 60, "query_size": 20, "k": 5, "rounds": 2, "probe_epochs": 20}


@pytest.fixture(scope="module")
def classifier_pt(demo_store, tmp_path_factory):
    """A linear probe on the demo store's embeddings, saved as ``classifier.pt`` with the store's identity."""
    store = read_store(demo_store)
    targets = np.stack([condition_labels(store.meta, label) for label in LABELS], axis=1)
    head = fit_linear_head(store.embeddings, targets, epochs=30)
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    return save_classifier(
        path,
        head=head,
        labels=LABELS,
        encoder_identity=store.encoder_identity,
        thresholds=[0.5, 0.5],
        config={"test": True},
    )


@pytest.fixture(scope="module")
def rounds_result(demo_store):
    return simulate(demo_store, ["Cardiomegaly", "Edema"], show_progress=False, **SMALL)


@pytest.mark.parametrize("name", ["uncertainty", "boostmis"])
def test_select_with_a_model_respects_the_patient_rule_and_exclude(demo_store, classifier_pt, tmp_path, name):
    first = select(demo_store, 15, selector=name, model=classifier_pt)
    assert first.table["PatientID"].is_unique and first.table["score"].notna().all()
    first.table.to_csv(tmp_path / "round1.csv", index=False)
    second = select(demo_store, 15, selector=name, model=classifier_pt.parent, exclude=tmp_path / "round1.csv")
    assert not set(second.table["Path"]) & set(first.table["Path"])
    assert not set(second.table["PatientID"]) & set(first.table["PatientID"]), "labelled patients leave the pool"
    assert second.table["PatientID"].is_unique


def test_select_runs_boostmis_once_for_picks_and_scores(demo_store, classifier_pt, monkeypatch):
    """VAT and density are the costly part: `select` derives both the picks and their scores from one pass."""
    from xsel.train.uncertainty import BoostMISSelector

    calls = []
    vat = BoostMISSelector.adversarial_kl
    monkeypatch.setattr(BoostMISSelector, "adversarial_kl", lambda self, *a: calls.append(1) or vat(self, *a))
    table = select(demo_store, 10, selector="boostmis", model=classifier_pt).table
    assert len(calls) == 1 and len(table) == 10
    assert table["score"].between(0, 1).all() and table["score"].iloc[0] == table["score"].max()


def test_uncertainty_scores_are_descending_and_one_label_can_be_chosen(demo_store, classifier_pt):
    table = select(demo_store, 20, model=classifier_pt, label="Edema").table
    assert set(table["selector"]) == {"uncertainty"}, "uncertainty is the default with a model"
    assert (np.diff(table["score"].to_numpy()) <= 1e-12).all()
    with pytest.raises(InputError, match="--label 'Oedema'.*trained on Cardiomegaly, Edema"):
        select(demo_store, 5, model=classifier_pt, label="Oedema")


def test_a_classifier_of_another_encoder_is_refused_naming_both(demo_store, classifier_pt, tmp_path):
    from xsel.train.head import load_classifier

    other = load_classifier(classifier_pt)
    path = save_classifier(
        tmp_path / "classifier.pt",
        head=other.head,
        labels=other.labels,
        encoder_identity={**other.encoder_identity, "encoder": "resnet18"},
        thresholds=other.thresholds,
        config={},
    )
    with pytest.raises(InputError) as error:
        select(demo_store, 5, selector="boostmis", model=path)
    message = str(error.value)
    assert "its classifier was trained on embeddings of resnet18" in message and "made by pixels" in message


def test_cli_select_with_a_model_end_to_end(demo_store, classifier_pt, tmp_path, cli):
    out = tmp_path / "next.csv"
    result = cli("select", demo_store, "--k", "10", "--out", out, "--selector", "boostmis", "--model", classifier_pt)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns[:4]) == ["rank", "Path", "score", "selector"] and len(table) == 10
    assert set(table["selector"]) == {"boostmis"}
    again = tmp_path / "again.csv"
    cli("select", demo_store, "--k", "10", "--out", again, "--selector", "boostmis", "--model", classifier_pt)
    assert pd.read_csv(again)["Path"].tolist() == table["Path"].tolist(), "same seed, same picks"


def test_cli_select_model_errors(demo_store, classifier_pt, tmp_path, cli):
    out = ["--out", str(tmp_path / "x.csv")]
    cases = [
        (["--selector", "uncertainty"], "uncertainty needs a trained classifier: add --model RUN_DIR/classifier.pt"),
        (["--selector", "boostmis"], "boostmis needs a trained classifier: add --model"),
        (["--selector", "typiclust", "--model", classifier_pt], "selector 'typiclust' takes no model: --model is for"),
        (["--selector", "kcenter", "--label", "Edema"], "selector 'kcenter' takes no label"),
        (["--model", tmp_path / "missing"], "classifier checkpoint not found"),
        (["--model", classifier_pt, "--bundle", tmp_path], "--model and --label apply to a store, not to --bundle"),
    ]
    for args, message in cases:
        result = cli("select", demo_store, "--k", "5", *out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output, (args, result.stderr)
    assert not (tmp_path / "x.csv").exists()


def test_rounds_grow_by_k_share_the_cold_start_and_never_repeat(rounds_result):
    table = rounds_result.rounds
    assert list(table.columns[: len(ROUNDS_COLUMNS)]) == list(ROUNDS_COLUMNS)
    assert set(table["strategy"]) == {"random", "typiclust", "uncertainty", "boostmis"}
    assert len(table) == 2 * 2 * 4 * 3  # conditions × episodes × strategies × (cold start + 2 rounds)
    assert (table["labelled"] == (table["round"] + 1) * 5).all()
    start = table[table["round"] == 0]
    per_episode = start.groupby(["condition", "episode"])[["auroc", "positives"]].nunique()
    assert (per_episode == 1).all().all(), "every strategy starts from the same cold-start picks"
    assert table["auroc"].between(0, 1).all()
    summary = rounds_result.summary
    random_rows = summary[summary["strategy"] == "random"]
    assert (random_rows["diff_vs_random"] == 0).all()
    assert (summary[summary["round"] == 0]["diff_vs_random"] == 0).all()
    assert set(summary["labelled"]) == {5, 10, 15}


def test_no_row_is_picked_twice_within_an_episode(demo_store, monkeypatch):
    import xsel.train.active_learning as module

    fitted = []
    real = module.fit_probe

    def record(embeddings, labels, **options):
        fitted.append(embeddings)
        return real(embeddings, labels, **options)

    monkeypatch.setattr(module, "fit_probe", record)
    simulate(demo_store, ["Edema"], selectors=["uncertainty"], show_progress=False, **{**SMALL, "episodes": 1})
    final = fitted[-1]  # uncertainty's last round: 15 labelled rows
    assert len(final) == 15 and len(np.unique(final, axis=0)) == 15


def test_a_single_class_labelled_set_still_gets_a_probe():
    from xsel.train.active_learning import fit_probe, probe_logits

    embeddings = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    for labels in (np.zeros(10), np.ones(10)):
        scores = probe_logits(fit_probe(embeddings, labels, epochs=50, seed=0), embeddings)
        assert np.isfinite(scores).all() and (scores.mean() > 0) == labels[0], "it leans to the one class it saw"


def test_same_seed_same_rounds(demo_store, rounds_result):
    again = simulate(demo_store, ["Cardiomegaly", "Edema"], show_progress=False, **SMALL)
    assert again.rounds.equals(rounds_result.rounds)


def test_rounds_report_files(rounds_result, tmp_path):
    written = {p.name for p in write_rounds_report(rounds_result, tmp_path)}
    assert written == {"rounds.csv", "rounds_summary.csv", "rounds_summary.json", "rounds.png"}
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert {"episode", "condition", "strategy", "round", "labelled", "auroc"} <= set(rounds.columns)
    payload = json.loads((tmp_path / "rounds_summary.json").read_text())
    assert payload["settings"]["labelled"] == [5, 10, 15] and payload["settings"]["cold_start"] == "typiclust"
    assert (tmp_path / "rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_evaluate_rounds_end_to_end(demo_store, tmp_path, cli):
    result = cli(
        "evaluate",
        demo_store,
        "--conditions",
        "Edema",
        "--rounds",
        "2",
        "--selectors",
        "kcenter,boostmis",
        "--out",
        tmp_path,
        "--episodes",
        "2",
        "--pool-size",
        "60",
        "--query-size",
        "20",
        "--k",
        "5",
        "--probe-epochs",
        "20",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert "15 labels" in result.stdout and "boostmis" in result.stdout
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert set(rounds["strategy"]) == {"random", "kcenter", "boostmis"} and rounds["round"].max() == 2


def test_cli_evaluate_leaves_unset_options_to_the_library_defaults(demo_store, tmp_path, cli, monkeypatch):
    """Options not given are not passed, so simulate's COLD_START / PROBE_EPOCHS / episodes apply."""
    import xsel.train.active_learning

    calls = []

    def record(store, conditions, **options):
        calls.append(options)
        raise InputError("recorded")

    monkeypatch.setattr(xsel.train.active_learning, "simulate", record)
    base = ["evaluate", demo_store, "--conditions", "Edema", "--rounds", "2", "--out", tmp_path, "-q"]
    assert cli(*base).exit_code == 2 and cli(*base, "--probe-epochs", "7", "--episodes", "3").exit_code == 2
    assert not {"cold_start", "probe_epochs", "episodes"} & set(calls[0])
    assert calls[1]["probe_epochs"] == 7 and calls[1]["episodes"] == 3


def test_cli_evaluate_rounds_bad_input(demo_store, tmp_path, cli):
    base = ["--conditions", "Edema", "--out", str(tmp_path / "r"), "--episodes", "1", "--pool-size", "60"]
    cases = [
        (["--rounds", "2", "--k", "5,10"], "with --rounds give one K"),
        (["--rounds", "2", "--classifier", "knn"], "--classifier applies without --rounds"),
        (["--cold-start", "kcenter"], "add --rounds R"),
        (["--rounds", "2", "--cold-start", "uncertainty"], "cold start 'uncertainty' needs a classifier"),
        (["--rounds", "2", "--selectors", "boostmis=x.pt"], "with --rounds, boostmis reads each round's linear probe"),
        (
            ["--rounds", "20", "--k", "5", "--query-size", "20"],
            "fewer than the 105 that a cold start and 20 rounds of K=5 label",
        ),
    ]
    for args, message in cases:
        result = cli("evaluate", demo_store, *base, *args, "-q")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "r").exists()


@pytest.mark.realdata
def test_realcxr_rounds_run_on_nih(realcxr, tmp_path):
    """A quick active-learning run on the NIH part of the real pack with the pixels encoder."""
    from xsel.embed import embed

    frame = pd.read_csv(realcxr / "labels.csv")
    frame = frame[frame["Source"].isin(["nih-talo", "nih-zech"])].head(400)
    frame["Path"] = [str(realcxr / p) for p in frame["Path"]]
    frame.to_csv(tmp_path / "nih.csv", index=False)
    embed(tmp_path / "nih.csv", tmp_path / "nih.h5", encoder="pixels", workers=0, show_progress=False)
    result = simulate(
        tmp_path / "nih.h5",
        ["Infiltration"],
        rounds=2,
        k=10,
        episodes=3,
        pool_size=120,
        query_size=20,
        show_progress=False,
    )
    assert result.rounds["auroc"].between(0, 1).all() and result.rounds["labelled"].max() == 30


def test_evaluate_takes_a_fixed_classifier_as_name_equals_file(demo_store, classifier_pt):
    from xsel.evaluate import evaluate

    result = evaluate(
        demo_store,
        ["Edema"],
        selectors=[f"uncertainty={classifier_pt}"],
        episodes=2,
        pool_size=60,
        query_size=20,
        k=[5],
        show_progress=False,
    )
    assert set(result.episodes["selector"]) == {"random", "uncertainty"}
