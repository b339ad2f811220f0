"""`xsel evaluate`: paired episodes, statistics, report files, the CLI and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import QUICK_EVALUATION
from xsel.evaluate import evaluate, paired_margins, summarize, write_report

SMALL = {"pool_size": 80, "query_size": 20, "episodes": 6}


@pytest.fixture(scope="module")
def result(demo_store):
    return evaluate(
        demo_store,
        ["Cardiomegaly", "Pleural Effusion"],
        selectors=["kcenter", "oracle-balanced"],
        k=[4, 10],
        show_progress=False,
        **SMALL,
    )


def test_every_selector_sees_the_same_episodes(result):
    table = result.episodes
    assert set(table["selector"]) == {"random", "kcenter", "oracle-balanced"}, "random is always the reference"
    assert len(table) == 2 * 6 * 3 * 2
    per_episode = table.groupby(["condition", "episode", "k"])[["pool_size", "pool_positives", "query_size"]].nunique()
    assert (per_episode == 1).all().all()


def test_oracle_balanced_picks_half_positives(result):
    oracle = result.episodes[result.episodes["selector"] == "oracle-balanced"]
    assert (oracle["positives_picked"] == oracle["k"] // 2).all()


def test_summary_statistics(result):
    summary = result.summary
    assert set(summary["condition"]) == {"Cardiomegaly", "Pleural Effusion", "all"}
    assert (summary["auroc_low"] <= summary["auroc"]).all() and (summary["auroc"] <= summary["auroc_high"]).all()
    random_rows = summary[summary["selector"] == "random"]
    assert (random_rows["diff_vs_random"] == 0).all() and (random_rows["win_rate"] == 0.5).all()
    episodes = result.episodes
    mine = episodes[(episodes["selector"] == "kcenter") & (episodes["k"] == 10)].sort_values(["condition", "episode"])
    ref = episodes[(episodes["selector"] == "random") & (episodes["k"] == 10)].sort_values(["condition", "episode"])
    expected = (mine["auroc"].to_numpy() - ref["auroc"].to_numpy()).mean()
    row = summary[(summary["selector"] == "kcenter") & (summary["k"] == 10) & (summary["condition"] == "all")].iloc[0]
    assert row["diff_vs_random"] == pytest.approx(expected)
    assert row["diff_low"] <= row["diff_vs_random"] <= row["diff_high"]


def test_constant_scores_give_a_zero_width_interval():
    table = pd.DataFrame(
        {
            "episode": [0, 1, 2] * 2,
            "condition": "A",
            "selector": ["random"] * 3 + ["x"] * 3,
            "k": 5,
            "auroc": [0.6] * 3 + [0.7] * 3,
            "ap": 0.5,
            "f1": 0.5,
            "kappa": 0.0,
        }
    )
    row = summarize(table).query("selector == 'x' and condition == 'all'").iloc[0]
    assert row["auroc_low"] == pytest.approx(0.7) and row["auroc_high"] == pytest.approx(0.7)
    assert row["diff_vs_random"] == pytest.approx(0.1) and row["win_rate"] == 1.0


def test_paired_margins_weigh_each_table_the_same():
    rng = np.random.default_rng(0)

    def table(shift: float, conditions: list[str]) -> pd.DataFrame:
        base = rng.uniform(0.5, 0.9, (len(conditions), 40))
        rows = []
        for name, scores in {
            "best": base,
            "lagging": base - shift,
            "noisy": base + rng.normal(0, 0.05, base.shape),
        }.items():
            for c, condition in enumerate(conditions):
                rows += [
                    {"episode": e, "condition": condition, "selector": name, "k": 20, "auroc": v}
                    for e, v in enumerate(scores[c])
                ]
        return pd.DataFrame(rows)

    one_condition, three_conditions = table(0.1, ["A"]), table(0.3, ["B", "C", "D"])
    margins = paired_margins([one_condition, three_conditions], "best")
    assert set(margins) == {"lagging", "noisy"}
    lagging = margins["lagging"]  # a constant gap per table: a CI of zero width at the mean of the two tables' gaps
    assert lagging["diff"] == pytest.approx(-0.2) and lagging["low"] == pytest.approx(-0.2)
    assert lagging["high"] == pytest.approx(-0.2)
    noisy = margins["noisy"]
    assert noisy["low"] < 0 < noisy["high"] and noisy["low"] <= noisy["diff"] <= noisy["high"]
    assert paired_margins([one_condition, three_conditions], "best") == margins, "seeded"
    with pytest.raises(ValueError, match="one K"):
        paired_margins([one_condition.assign(k=[5, 10] * (len(one_condition) // 2))], "best")


def test_report_files(result, tmp_path):
    written = {p.name for p in write_report(result, tmp_path)}
    assert written == {"episodes.csv", "summary.csv", "summary.json", "auroc.png", "auroc_vs_k.png"}
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert payload["settings"]["k"] == [4, 10] and payload["summary"]
    episodes = pd.read_csv(tmp_path / "episodes.csv")
    assert {"episode", "condition", "selector", "k", "auroc", "ap", "f1", "kappa"} <= set(episodes.columns)
    assert (tmp_path / "auroc.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_numbers(demo_store):
    runs = [evaluate(demo_store, ["Edema"], selectors=["typiclust"], show_progress=False, **SMALL) for _ in range(2)]
    assert runs[0].episodes.equals(runs[1].episodes)


def test_cli_end_to_end_with_a_single_selector(demo_store, tmp_path, cli):
    result = cli(
        "evaluate",
        demo_store,
        "--conditions",
        "Edema",
        "--selectors",
        "random",
        "--out",
        tmp_path,
        "--report",
        tmp_path / "report.html",
        *QUICK_EVALUATION,
    )
    assert result.exit_code == 0, result.output
    assert "K=5" in result.stdout and (tmp_path / "summary.csv").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and "Edema" in html and "random" in html


def test_cli_json(demo_store, tmp_path, cli):
    result = cli(
        "evaluate",
        demo_store,
        "--conditions",
        "Edema",
        "--selectors",
        "kcenter",
        "--out",
        tmp_path,
        *QUICK_EVALUATION,
        "--json",
    )
    payload = json.loads(result.stdout)
    assert {row["selector"] for row in payload["summary"]} == {"random", "kcenter"}


def test_bad_input(demo_store, tmp_path, cli):
    base = ["--out", str(tmp_path / "r"), "--episodes", "2", "--pool-size", "60", "--query-size", "20"]
    cases = [
        (["--conditions", "Oedema"], "unknown condition 'Oedema'; label columns in this store: Cardiomegaly"),
        (["--conditions", "Edema", "--k", "0"], "every K must be at least 1"),
        (["--conditions", "Edema", "--k", "ten"], "give whole numbers"),
        (["--conditions", "Edema", "--selectors", "best"], "unknown selector 'best'"),
        (["--conditions", "Edema", "--classifier", "svm"], "unknown classifier 'svm'"),
        (["--conditions", "Edema", "--uncertain", "maybe"], "--uncertain maybe: choose one of"),
        (["--conditions", " , "], "--conditions is empty"),
        ([], "give --conditions (or --protocol archive); label columns in this store: Cardiomegaly"),
        (["--conditions", "Edema", "--protocol", "museum"], "--protocol museum: choose one of conditions, archive"),
        (["--protocol", "archive", "--rounds", "2"], "--rounds simulates condition episodes"),
    ]
    for args, message in cases:
        result = cli("evaluate", demo_store, *base, *args, "-q")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "r").exists()


def test_bootstrap_ci_covers_a_known_mean():
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "episode": np.tile(np.arange(200), 2),
            "condition": "A",
            "selector": ["random"] * 200 + ["x"] * 200,
            "k": 5,
            "auroc": np.concatenate([rng.normal(0.6, 0.05, 200), rng.normal(0.65, 0.05, 200)]),
            "ap": 0.5,
            "f1": 0.5,
            "kappa": 0.0,
        }
    )
    row = summarize(table).query("selector == 'x' and condition == 'A'").iloc[0]
    assert row["auroc_low"] < 0.65 < row["auroc_high"] and row["auroc_high"] - row["auroc_low"] < 0.03


# --protocol archive: random draws of the whole store, the picks labelled for every condition


@pytest.fixture(scope="module")
def archive(demo_store):
    return evaluate(
        demo_store,
        protocol="archive",
        selectors=["kcenter", "oracle-balanced"],
        k=[4, 10],
        show_progress=False,
        **SMALL,
    )


def test_archive_episodes_are_reproducible_and_never_share_a_patient(demo_store):
    from xsel.episodes import ArchiveTask
    from xsel.store import read_store

    store = read_store(demo_store)
    patients = store.meta["PatientID"].to_numpy()
    for allow_same_patient in (False, True):
        task = ArchiveTask(store, pool_size=80, query_size=20, k=10, allow_same_patient=allow_same_patient)
        first, again, other = task.episode(3, seed=0), task.episode(3, seed=0), task.episode(4, seed=0)
        assert np.array_equal(first.query, again.query) and np.array_equal(first.pool, again.pool)
        assert first.seed == again.seed and not np.array_equal(first.query, other.query)
        assert len(first.query) == 20 and len(first.pool) == 80
        assert not set(patients[first.pool]) & set(patients[first.query])
        assert np.all(np.diff(first.pool) > 0) and np.all(np.diff(first.query) > 0), "rows in store order"
        if not allow_same_patient:
            both = np.concatenate([first.pool, first.query])
            assert len(set(patients[both])) == len(both), "one image per patient"
    assert "No Finding" not in task.conditions, "a 1/blank column has no known negatives to score"
    assert np.array_equal(first.query_labels[:, 0], task.labels[first.query, 0], equal_nan=True)


def test_archive_scores_every_condition_with_both_classes_in_the_query(archive, demo_store):
    from xsel.episodes import ArchiveTask
    from xsel.store import read_store

    assert archive.settings["protocol"] == "archive" and archive.settings["negative"] is None
    task = ArchiveTask(read_store(demo_store), pool_size=80, query_size=20, k=10)
    assert archive.settings["conditions"] == list(task.conditions)
    for index, rows in archive.episodes.groupby("episode"):
        query_labels = task.episode(index, seed=0).query_labels
        both = sum(
            ((query_labels[:, j] == 1).any() and (query_labels[:, j] == 0).any()) for j in range(len(task.conditions))
        )
        assert (rows["conditions_scored"] == both).all() and both > 0
    assert archive.episodes["probe_auroc"].between(0, 1).all()


def test_archive_rows_are_paired_and_summarized_with_the_probe(archive):
    table = archive.episodes
    assert set(table["condition"]) == {"archive"}
    assert len(table) == 6 * 3 * 2
    per_episode = table.groupby(["episode", "k"])
    assert (per_episode["selector"].nunique() == 3).all()
    assert (per_episode[["pool_size", "query_size", "conditions_scored", "pool_positives"]].nunique() == 1).all().all()
    summary = archive.summary
    assert set(summary["condition"]) == {"archive", "all"}
    random_rows = summary[summary["selector"] == "random"]
    assert (random_rows["probe_diff_vs_random"] == 0).all() and (random_rows["probe_win_rate"] == 0.5).all()
    mine = table[(table["selector"] == "kcenter") & (table["k"] == 10)].sort_values("episode")
    ref = table[(table["selector"] == "random") & (table["k"] == 10)].sort_values("episode")
    row = summary.query("selector == 'kcenter' and k == 10 and condition == 'all'").iloc[0]
    expected = (mine["probe_auroc"].to_numpy() - ref["probe_auroc"].to_numpy()).mean()
    assert row["probe_diff_vs_random"] == pytest.approx(expected)
    assert row["probe_auroc_low"] <= row["probe_auroc"] <= row["probe_auroc_high"]


def test_archive_oracle_balances_the_first_condition(demo_store):
    result = evaluate(
        demo_store,
        ["Cardiomegaly"],
        protocol="archive",
        selectors=["oracle-balanced"],
        k=[10],
        show_progress=False,
        **SMALL,
    )
    oracle = result.episodes[result.episodes["selector"] == "oracle-balanced"]
    assert (oracle["positives_picked"] == 5).all() and result.settings["conditions"] == ["Cardiomegaly"]


def test_archive_unknown_labels_are_left_out_and_one_class_picks_score_a_constant():
    from xsel.evaluate import probe_scores, scored_conditions

    query_labels = np.array([[1, 1, 1], [0, np.nan, 0], [np.nan, np.nan, 1]])
    assert scored_conditions(query_labels) == [0, 2]
    embeddings = np.random.default_rng(0).normal(size=(6, 4))
    assert (probe_scores(embeddings[:3], np.array([1, 1, 1]), embeddings[3:]) == 0).all()
    assert len(np.unique(probe_scores(embeddings[:4], np.array([1, 0, 1, 0]), embeddings[3:]))) > 1


def test_cli_archive(demo_store, tmp_path, cli):
    result = cli(
        "evaluate",
        demo_store,
        "--protocol",
        "archive",
        "--selectors",
        "kcenter",
        "--out",
        tmp_path,
        "--report",
        tmp_path / "report.html",
        *QUICK_EVALUATION,
    )
    assert result.exit_code == 0, result.output
    assert "archive episodes" in result.stdout and "Conditions labelled: Cardiomegaly" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["protocol"] == "archive"
    assert "probe_auroc" in pd.read_csv(tmp_path / "episodes.csv").columns
    assert "probe AUROC" in (tmp_path / "report.html").read_text()


def test_episodes_within_keep_a_condition_to_the_hospitals_that_label_it():
    import re

    from tests.test_medselect import toy_store
    from xsel.errors import InputError

    store = toy_store()
    north = np.arange(len(store)) < 150
    store.meta["Source"] = np.where(north, "north", "south")
    store.meta["C"] = np.where(north, store.meta["A"], 0.0)  # only the north labels C; south's normals carry 0
    options = dict(selectors=["kcenter"], episodes=3, pool_size=1000, query_size=20, show_progress=False)
    mixed = evaluate(store, ["C"], **options)
    kept = evaluate(store, ["C"], episodes_within="Source", **options)

    def pool(result) -> int:
        return int(re.search(r"a pool of (\d+)", " ".join(result.warnings))[1])

    assert pool(kept) <= 150 - 20 < pool(mixed), "the south's normals are left out of C's episodes"
    assert kept.settings["episodes_within"] == "Source" and mixed.settings["episodes_within"] is None
    with pytest.raises(InputError, match="--episodes-within Ward: .* no such column"):
        evaluate(store, ["C"], episodes_within="Ward", **options)
    with pytest.raises(InputError, match="archive pools"):
        evaluate(store, protocol="archive", episodes_within="Source", **options)


def test_evaluate_with_a_missing_hospital_column_is_exit_2_and_writes_nothing(demo_store, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("evaluate", demo_store, "--conditions", "Edema", "--episodes-within", "Ward", "--out", out)
    assert result.exit_code == 2 and "--episodes-within Ward" in result.stderr and "Traceback" not in result.output
    assert not out.exists()
