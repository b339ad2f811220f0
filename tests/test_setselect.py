"""The set selector: order-free sequential picks, its training, export, trust gate, adaptation and the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_medselect import toy_config, toy_store, train_until_interrupted
from xsel.episodes import EpisodeTask
from xsel.errors import InputError
from xsel.geometry import unit_rows
from xsel.selection import select
from xsel.store import Store, read_store, write_store
from xsel.train import setselect
from xsel.train.medselect import MedSelectSelector, SetSelector, load_checkpoint
from xsel.train.selector import GATE_DRAWS, adapt_selector, split_patients, train_selector
from xsel.train.setselect import SetPolicy
from xsel.trust import CLUSTERS


def set_config(**changes):
    return toy_config(model="set", hidden=16, samples=3, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("set")
    store = toy_store()
    train_selector(store, run, set_config(episodes=16 * 30, val_every=10), show_progress=False)
    return store, run / "selector.pt"


def test_a_shuffled_pool_gets_the_same_picks(trained):
    store, checkpoint = trained
    selector = SetSelector(checkpoint)
    pool = store.embeddings[:80]
    picks = selector.select(pool, 10, seed=0)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(pool))
        shuffled = order[selector.select(pool[order], 10, seed=0)]
        assert shuffled.tolist() == picks.tolist(), "same set, and the same order"


def test_sequential_picks_never_repeat_and_fill_a_small_pool():
    torch.manual_seed(0)
    policy = SetPolicy(8, hidden=16).eval()
    for size, k in ((5, 20), (40, 40), (33, 7)):
        with torch.no_grad():
            scores, picks = policy(torch.randn(2, size, 8), torch.tensor(k))
        assert picks.shape == (2, min(k, size)) and scores.shape == (2, size)
        for row in picks.tolist():
            assert len(set(row)) == len(row) and all(0 <= i < size for i in row)


def test_sampling_gives_the_log_probability_of_the_sequence():
    torch.manual_seed(0)
    policy = SetPolicy(4, hidden=8, read_embedding=True)
    pool = torch.randn(1, 3, 4)
    picks, log_prob = policy.sample(pool, 3, 2000, torch.Generator().manual_seed(0))
    assert all(len(set(row)) == 3 for row in picks.tolist())
    sequences, counts = np.unique(picks.numpy(), axis=0, return_counts=True)
    for sequence, count in zip(sequences, counts, strict=True):
        probability = float(log_prob.detach()[(picks == torch.from_numpy(sequence)).all(1)][0].exp())
        assert abs(count / 2000 - probability) < 0.03, sequence
    (-log_prob.mean()).backward()
    assert all(p.grad is not None for name, p in policy.named_parameters() if not name.startswith("layers.1.points"))


def test_teacher_forcing_gives_the_log_probability_sampling_gave():
    torch.manual_seed(0)
    policy = SetPolicy(6, hidden=8, read_embedding=True)
    pool = torch.randn(2, 12, 6)
    picks, sampled = policy.sample(pool, 5, 3, torch.Generator().manual_seed(1))
    forced = policy.log_prob(pool.repeat_interleave(3, dim=0), picks)
    assert torch.allclose(forced, sampled, atol=1e-5)


@pytest.fixture(scope="module")
def lstm_teacher(tmp_path_factory):
    """An LSTM trained on the toy problem: the teacher a set selector is distilled from."""
    run = tmp_path_factory.mktemp("teacher")
    train_selector(toy_store(), run, toy_config(episodes=16 * 30, val_every=10), show_progress=False)
    return run / "selector.pt"


def test_distillation_learns_the_teachers_picks(lstm_teacher, tmp_path):
    store = toy_store()
    config = set_config(teacher=str(lstm_teacher), episodes=16 * 40, val_every=20, average_steps=0)
    train_selector(store, tmp_path / "student", config, show_progress=False)
    teacher, student = MedSelectSelector(lstm_teacher), SetSelector(tmp_path / "student" / "selector.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = SetPolicy(store.embeddings.shape[1], hidden=16, read_embedding=True).eval()
    rng = np.random.default_rng(3)
    agreement, before = [], []
    for _ in range(10):
        pool = store.embeddings[np.sort(rng.choice(len(store), 60, replace=False))]
        taught = set(teacher.select(pool, 6, seed=0).tolist())
        agreement.append(len(taught & set(student.select(pool, 6, seed=0).tolist())) / 6)
        with torch.no_grad():
            naive = untrained(torch.from_numpy(pool)[None], torch.tensor(6))[1][0].tolist()
        before.append(len(taught & set(naive)) / 6)
    assert np.mean(agreement) >= 0.6 and np.mean(agreement) > np.mean(before) + 0.2, (agreement, before)
    metrics = pd.read_csv(tmp_path / "student" / "metrics.csv")
    assert metrics["loss"].head(5).mean() > metrics["loss"].tail(5).mean(), "the teacher's picks got likelier"
    saved = load_checkpoint(tmp_path / "student" / "selector.pt")["config"]
    assert saved["teacher"] == str(lstm_teacher) and len(saved["teacher_sha256"]) == 64


def test_a_teacher_is_refused_for_the_lstm_for_other_inputs_and_when_changed(lstm_teacher, tmp_path, monkeypatch):
    store = toy_store()
    with pytest.raises(InputError, match="--teacher .*add --model set"):
        train_selector(store, tmp_path / "a", toy_config(teacher=str(lstm_teacher)), show_progress=False)
    with pytest.raises(InputError, match="without --use-metadata"):
        train_selector(
            store, tmp_path / "b", set_config(teacher=str(lstm_teacher), use_metadata=True), show_progress=False
        )
    other = Store(store.path, store.embeddings, store.paths, store.meta, store.attrs | {"encoder": "another"})
    with pytest.raises(InputError, match="train the teacher on a store of this encoder"):
        train_selector(other, tmp_path / "c", set_config(teacher=str(lstm_teacher)), show_progress=False)
    copy = tmp_path / "teacher.pt"
    copy.write_bytes(lstm_teacher.read_bytes())
    config = set_config(teacher=str(copy), episodes=16 * 4, val_every=2)
    train_until_interrupted(store, tmp_path / "run", config, monkeypatch, step=3)
    monkeypatch.undo()
    payload = torch.load(copy, weights_only=True)
    payload["step"] = -1
    torch.save(payload, copy)
    with pytest.raises(InputError, match="changed since this run began"):
        train_selector(store, tmp_path / "run", None, resume=True, show_progress=False)


def test_learns_to_beat_random_on_the_toy_problem(trained, tmp_path):
    store, checkpoint = trained
    payload = load_checkpoint(checkpoint)
    assert payload["config"]["model"] == "set" and payload["val_auroc"] > payload["val_random_auroc"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    store, config = toy_store(), set_config(episodes=16 * 6, val_every=3)
    train_selector(store, tmp_path / "straight", config, show_progress=False)
    train_selector(store, tmp_path / "resumed", set_config(episodes=16 * 3, val_every=3), show_progress=False)
    with pytest.raises(InputError, match="--episodes 48 → 96"):
        train_selector(store, tmp_path / "resumed", {"episodes": 96, "k": 6}, resume=True, show_progress=False)


def test_resume_after_an_interruption_is_identical(tmp_path, monkeypatch):
    store, config = toy_store(), set_config(episodes=16 * 6, val_every=3)
    train_selector(store, tmp_path / "straight", config, show_progress=False)
    train_until_interrupted(store, tmp_path / "resumed", config, monkeypatch, step=4)
    train_selector(store, tmp_path / "resumed", None, resume=True, show_progress=False)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(straight["state_dict"][key], resumed["state_dict"][key]) for key in straight["state_dict"])
    assert straight["trust_gate"] == resumed["trust_gate"]


def test_averaged_weights_are_shipped_leave_training_unchanged_and_resume_exactly(tmp_path, monkeypatch):
    store = toy_store()
    plain = set_config(episodes=16 * 6, val_every=3, average_steps=0)
    averaged = set_config(episodes=16 * 6, val_every=3, average_steps=4)
    train_selector(store, tmp_path / "plain", plain, show_progress=False)
    train_selector(store, tmp_path / "straight", averaged, show_progress=False)
    train_until_interrupted(store, tmp_path / "resumed", averaged, monkeypatch, step=4)
    train_selector(store, tmp_path / "resumed", None, resume=True, show_progress=False)
    last = {name: load_checkpoint(tmp_path / name / "last.pt") for name in ("plain", "straight", "resumed")}
    trained = last["plain"]["state_dict"]
    assert "averaged" not in last["plain"]
    assert all(torch.equal(trained[key], last["straight"]["state_dict"][key]) for key in trained), "same training"
    mean = {key.removeprefix("module."): value for key, value in last["straight"]["averaged"].items()}
    resumed = {key.removeprefix("module."): value for key, value in last["resumed"]["averaged"].items()}
    assert all(torch.equal(mean[key], resumed[key]) for key in mean)
    assert int(mean["n_averaged"]) == 6
    assert any(not torch.allclose(trained[key], mean[key]) for key in trained), "the average is not the last step"
    shipped = load_checkpoint(tmp_path / "straight" / "selector.pt")
    assert shipped["step"] == 6, "the average as it stands at the last validation"
    assert all(torch.equal(shipped["state_dict"][key], mean[key]) for key in trained), "selector.pt is the average"
    with pytest.raises(InputError, match="--average-steps"):
        train_selector(store, tmp_path / "bad", set_config(average_steps=-1), show_progress=False)


@pytest.mark.parametrize("average_steps", [0, 4])
def test_an_average_ships_as_it_stands_and_a_step_only_when_it_validates_best(tmp_path, monkeypatch, average_steps):
    import xsel.train.selector as module

    falling = iter(np.linspace(0.9, 0.6, 20))  # every validation after the first scores worse
    monkeypatch.setattr(module, "_validate", lambda val, scorer, config, device: {"B": float(next(falling))})
    config = set_config(episodes=16 * 6, val_every=2, average_steps=average_steps)
    result = train_selector(toy_store(), tmp_path, config, show_progress=False)
    shipped = load_checkpoint(tmp_path / "selector.pt")
    assert result.averaged is bool(average_steps)
    # the first call scores random picks; validations at steps 2, 4, 6 get the next three values
    assert shipped["step"] == (6 if average_steps else 2) == result.best_step
    assert shipped["val_auroc"] == pytest.approx(np.linspace(0.9, 0.6, 20)[3 if average_steps else 1])


def test_a_run_saved_before_weight_averaging_resumes_without_it(tmp_path, monkeypatch):
    from xsel.train.checkpoints import save_torch_atomic

    store, config = toy_store(), set_config(episodes=16 * 6, val_every=3, average_steps=0)
    train_until_interrupted(store, tmp_path, config, monkeypatch, step=4)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    del saved["config"]["average_steps"]  # as an earlier xsel wrote it
    save_torch_atomic(saved, tmp_path / "last.pt")
    result = train_selector(store, tmp_path, None, resume=True, show_progress=False)
    last = load_checkpoint(tmp_path / "last.pt")
    assert result.steps == 6 and not result.averaged and "averaged" not in last
    assert last["config"]["average_steps"] == 0


def test_the_average_covers_the_later_half_of_a_short_run_and_the_last_steps_of_a_long_one():
    from torch.optim.swa_utils import AveragedModel

    from xsel.train.selector import _recent_average

    weight = torch.nn.Linear(1, 1, bias=False)
    averaged = AveragedModel(weight, multi_avg_fn=_recent_average(10))
    for step in range(1, 61):  # the weight at step t is t
        weight.weight.data.fill_(float(step))
        averaged.update_parameters(weight)
        if 2 <= step <= 20:  # step j weighs 2(j − 1) / (m(m − 1)) after m steps: the mean of the ramp is 2(m + 1)/3
            assert averaged.module.weight.item() == pytest.approx(2 * (step + 1) / 3, rel=1e-5)
    # an exponential average over the last 10 of a linear ramp lags it by about 9 steps, not by the whole run's 30
    assert 49 < averaged.module.weight.item() < 52


def test_the_checkpoint_names_its_plugin(trained):
    _, checkpoint = trained
    with pytest.raises(InputError, match=f"run it as setselect .*setselect={checkpoint}"):
        MedSelectSelector(checkpoint)


def test_the_gate_falls_back_on_another_hospital_and_not_at_home(trained):
    store, checkpoint = trained
    selector = SetSelector(checkpoint)
    gate = selector.trust_gate
    assert gate is not None and gate.fallback in ("random", "kcenter", "typiclust", "kmedoids", "probcover")
    config = selector.config  # calibrated on every condition's pools among the validation patients, not only on
    # the validation conditions' episodes and random draws: a labelling task's pool holds one finding and negatives
    assert gate.calibration["pools"] > GATE_DRAWS + len(config.val_conditions) * config.val_episodes
    # the reference is half the training images: the other half joins the validation images in the held-out pools,
    # so the threshold sees how much a few hundred new images vary, not only the few validation patients
    train_rows, _ = split_patients(store, config.val_fraction, config.seed)
    reference = unit_rows(store.embeddings[train_rows])
    matched = np.abs(gate.reference[:, None, :] - reference[None]).max(axis=2).min(axis=1) < 1e-6
    assert len(gate.reference) == len(train_rows) // 2 and matched.all()
    home = Store(
        path="home",
        embeddings=store.embeddings[:150],
        paths=store.paths[:150],
        meta=store.meta[:150],
        attrs=store.attrs,
    )
    shifted = Store(
        path="away",
        embeddings=store.embeddings[:150] * np.linspace(0.2, 3, 8, dtype=np.float32) + 2.0,
        paths=store.paths[:150],
        meta=store.meta[:150],
        attrs=store.attrs,
    )
    at_home = select(home, 10, selector=selector, seed=0)
    away = select(shifted, 10, selector=selector, seed=0)
    assert at_home.record["fallback"]["fired"] is False
    assert away.record["fallback"]["fired"] is True and any("fell back" in w for w in away.warnings)


def test_a_selector_validating_below_random_picks_is_said_so(tmp_path, capsys, monkeypatch):
    """A run whose shipped weights validate worse than random picks on the unseen conditions warns, naming both."""
    from xsel.train import selector as training

    def validate(tasks, scorer, config, device):
        return {condition: 0.70 if scorer is None else 0.60 for condition in config.val_conditions}

    monkeypatch.setattr(training, "_validate", validate)
    result = train_selector(toy_store(), tmp_path, set_config(episodes=16 * 2, val_every=2), show_progress=False)
    assert result.best_val_auroc < result.random_val_auroc
    assert "validates below random picks (0.600 < 0.700)" in capsys.readouterr().err


def test_a_scarce_validation_condition_trains_with_a_warning(tmp_path, capsys):
    store, config = toy_store(), set_config(val_conditions=["Rare"], episodes=16 * 2, val_every=2)
    _, validation = split_patients(store, config.val_fraction, config.seed)
    rare = np.zeros(len(store))
    rare[validation[store.meta["A"].to_numpy()[validation] == 1][:6]] = 1  # a handful of validation positives
    store.meta["Rare"] = rare
    result = train_selector(store, tmp_path, config, show_progress=False)
    err = capsys.readouterr().err
    assert result.steps == 2 and "Rare" in err
    assert "AUROC on 2 conditions of the store's patients" in err, "the seen condition referees the fallback too"
    with pytest.raises(InputError, match="no validation condition"):
        store.meta["None"] = 0.0
        train_selector(store, tmp_path / "none", set_config(val_conditions=["None"]), show_progress=False)


def test_balanced_episodes_and_several_negative_columns():
    store = toy_store()
    store.meta["Normal"] = np.where(store.meta["A"] == 1, np.nan, 1.0)
    store.meta["No Finding"] = np.where(np.arange(len(store)) % 2 == 0, store.meta["No Finding"], np.nan)
    one = EpisodeTask(store, "A", pool_size=60, query_size=20, k=6)
    both = EpisodeTask(store, "A", negative="No Finding,Normal", pool_size=60, query_size=20, k=6)
    assert len(both.negatives) > len(one.negatives)
    natural = both.episode(0, 0)
    balanced = both.episode(0, 0, balanced=True)
    assert natural.pool_labels.mean() < 0.3 and balanced.pool_labels.mean() == pytest.approx(0.5, abs=0.02)
    assert both.episode(0, 0).pool.tolist() == natural.pool.tolist(), "the default episode is unchanged"


def test_adaptation_without_labels(trained, tmp_path, capsys):
    store, checkpoint = trained
    site = Store(
        path="site",
        embeddings=store.embeddings * 1.5 + 0.5,
        paths=store.paths,
        meta=pd.DataFrame({"PatientID": store.meta["PatientID"]}),
        attrs=store.attrs,
    )
    result = adapt_selector(
        checkpoint, site, tmp_path, clusters=4, max_minutes=0.2, episodes=16 * 4, show_progress=False
    )
    assert result.steps == 4
    assert "fell back to" in capsys.readouterr().err, "the site is told its pools still fall back"
    adapted = SetSelector(tmp_path / "selector.pt")
    assert adapted.config.k == 6 and adapted.config.val_conditions == ["cluster 1", "cluster 2"]
    assert adapted.config.conditions and "cluster 1" not in adapted.config.conditions
    rng = np.random.default_rng(0)
    pools = [site.embeddings[rng.choice(len(site), 100, replace=False)] for _ in range(20)]
    assert all(adapted.trust_gate.check(pool, seed=0).fired for pool in pools), "the shipped gate: the site is away"
    shipped_gate, adapted_gate = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "selector.pt")
    # pseudo-tasks are no evidence that the site is home: the gate is the shipped one
    assert adapted_gate["trust_gate"] == shipped_gate["trust_gate"]
    assert adapted_gate["heuristics_val"] == shipped_gate["heuristics_val"]
    assert torch.equal(adapted_gate["trust_reference"], shipped_gate["trust_reference"])
    shipped, kept = load_checkpoint(checkpoint)["state_dict"], load_checkpoint(tmp_path / "selector.pt")["state_dict"]
    unchanged = all(torch.equal(kept[key], value) for key, value in shipped.items())
    assert unchanged == (result.best_step == 0), "the shipped weights stay unless adapted ones validate better"
    with pytest.raises(InputError, match="at least 4 clusters"):
        adapt_selector(checkpoint, site, tmp_path / "few", clusters=2, show_progress=False)
    kept = adapt_selector(checkpoint, site, tmp_path / "kept", clusters=4, max_minutes=0, show_progress=False)
    assert kept.steps == 0 and kept.best_step == 0, "no adapted weights validated: the shipped ones stay"
    assert all(
        torch.equal(load_checkpoint(kept.run_dir / "selector.pt")["state_dict"][k], v) for k, v in shipped.items()
    )


@pytest.mark.slow
def test_the_bundle_runs_the_sequential_loop_and_the_site_picks_what_the_workstation_picks(demo_store, tmp_path, cli):
    from xsel.bundle import Bundle
    from xsel.site import BundleSelector
    from xsel.train.export import export_bundle

    tiny = ["--conditions", "Cardiomegaly,Pleural Effusion", "--val-conditions", "Lung Opacity", "--pool-size", "60"]
    tiny += ["--query-size", "20", "--k", "5", "--episodes", "32", "--batch-size", "8", "--val-every", "2"]
    tiny += ["--val-episodes", "4", "-q"]
    teacher = cli("train", "selector", demo_store, *tiny, "--out", tmp_path / "lstm")
    assert teacher.exit_code == 0, teacher.output
    run = tmp_path / "run"  # a distilled set selector: the bundle runs it as any other
    distilled = ["--model", "set", "--hidden", "24", "--teacher", tmp_path / "lstm" / "selector.pt"]
    result = cli("train", "selector", demo_store, *tiny, *distilled, "--out", run)
    assert result.exit_code == 0, result.output
    manifest = export_bundle(tmp_path / "bundle", encoder="pixels", selector=run / "selector.pt")  # a bare checkpoint
    assert manifest["selector"]["name"] == "setselect" and manifest["selector"]["details"]["model"] == "set"
    saved = load_checkpoint(run / "selector.pt")["config"]
    assert saved["hidden"] == 24 and saved["teacher"] == str((tmp_path / "lstm" / "selector.pt").resolve())
    assert all(check["same_top_k"] for check in manifest["parity"]["selector"])
    workstation, site = SetSelector(run / "selector.pt"), BundleSelector(Bundle.load(tmp_path / "bundle"))
    embeddings = read_store(demo_store).embeddings
    for size in (13, 90):  # pool sizes other than the export's example and checks
        pool = embeddings[:size]
        assert site.select(pool, 6, seed=0).tolist() == workstation.select(pool, 6, seed=0).tolist()


def test_cli_trains_a_set_selector_and_refuses_a_bad_model(tmp_path, cli, demo_store):
    bad = cli(
        "train",
        "selector",
        demo_store,
        "--model",
        "gru",
        "--conditions",
        "Cardiomegaly",
        "--val-conditions",
        "Lung Opacity",
        "--out",
        tmp_path / "bad",
    )
    assert bad.exit_code == 2 and "--model gru" in bad.output
    common = ["--conditions", "Cardiomegaly", "--val-conditions", "Lung Opacity", "--teacher", tmp_path / "none.pt"]
    lstm = cli("train", "selector", demo_store, *common, "--out", tmp_path / "lstm")
    assert lstm.exit_code == 2 and "add --model set" in lstm.output
    missing = cli("train", "selector", demo_store, "--model", "set", *common, "--out", tmp_path / "missing")
    assert missing.exit_code == 2 and "none.pt" in missing.output and "Traceback" not in missing.output
    narrow = cli("train", "selector", demo_store, "--model", "set", "--hidden", "0", *common, "--out", tmp_path / "w")
    assert narrow.exit_code == 2 and "--hidden" in narrow.output


def test_conditions_all_trains_on_every_labelled_column(tmp_path, capsys):
    store = toy_store()
    store.meta["C"] = store.meta["A"]
    store.meta["Rare"] = (np.arange(len(store)) < 3).astype(float)
    train_selector(store, tmp_path, set_config(conditions=["all"], episodes=16 * 2, val_every=2), show_progress=False)
    assert load_checkpoint(tmp_path / "selector.pt")["config"]["conditions"] == ["A", "C"]
    assert "leaves out Rare" in capsys.readouterr().err


def test_episodes_stay_within_the_hospitals_that_label_a_condition(tmp_path):
    from xsel.train.selector import episode_task

    store = toy_store()
    north = np.arange(len(store)) < 250
    store.meta["Source"] = np.where(north, "north", "south")
    store.meta["C"] = np.where(north, store.meta["A"], 0.0)  # only the north labels C; south's normals carry 0
    rows = np.arange(len(store))
    mixed = episode_task(store, set_config(), "C", rows, min_query_per_class=5).episode(0, 0)
    kept = episode_task(store, set_config(episodes_within="Source"), "C", rows, min_query_per_class=5).episode(0, 0)
    assert not north[mixed.pool].all(), "without the option, south's normals join C's episodes"
    assert north[kept.pool].all() and north[kept.query].all()
    config = set_config(conditions=["C"], episodes_within="Source", episodes=16 * 2, val_every=2)
    train_selector(store, tmp_path / "run", config, show_progress=False)
    assert load_checkpoint(tmp_path / "run" / "selector.pt")["config"]["episodes_within"] == "Source"
    with pytest.raises(InputError, match="--episodes-within Ward: .* no such column"):
        train_selector(store, tmp_path / "ward", set_config(episodes_within="Ward"), show_progress=False)


def test_a_selector_trained_within_hospitals_gates_each_of_them(tmp_path, cli):
    """Trained on two hospitals, one a third the size and unlike the other: the gate keeps a reference per
    hospital, so the smaller one's pools — and pools blending both — are its own, not foreign, while a pool from
    neither still fires."""
    store = toy_store(900)
    south = np.arange(len(store)) >= 600
    store.embeddings[south, 2:] += 3.0  # another scanner: every south image moved the same way
    store.meta["Source"] = np.where(south, "south", "north")
    rng = np.random.default_rng(5)

    def gate_of(episodes_within: str):
        config = set_config(conditions=["A"], episodes_within=episodes_within, episodes=16 * 2, val_every=2)
        train_selector(store, tmp_path / (episodes_within or "mixture"), config, show_progress=False)
        return SetSelector(tmp_path / (episodes_within or "mixture") / "selector.pt").trust_gate

    mixture, grouped = gate_of(""), gate_of("Source")
    assert mixture.groups == (), "one hospital: the training pools' reference whole"
    assert [g.source for g in grouped.groups] == ["Source=north"] * CLUSTERS + ["Source=south"] * CLUSTERS
    pools = [store.embeddings[rng.choice(np.flatnonzero(south), 60, replace=False)] for _ in range(10)]
    assert sum(mixture.check(pool, seed=i).fired for i, pool in enumerate(pools)) >= 8, "south is foreign to the mix"
    verdicts = [grouped.check(pool, seed=i) for i, pool in enumerate(pools)]
    assert sum(v.fired for v in verdicts) <= 2 and {v.nearest for v in verdicts} == {"Source=south"}
    elsewhere = store.embeddings[:60] - np.r_[0.0, 0.0, 3.0 * np.ones(6)]  # neither hospital's look
    assert grouped.check(elsewhere, seed=0).fired
    blends = [  # as two repackagings of one archive: a mixture of the training hospitals, in other proportions
        store.embeddings[np.r_[rng.choice(np.flatnonzero(~south), 30), rng.choice(np.flatnonzero(south), 30)]]
        for _ in range(10)
    ]
    assert sum(grouped.check(pool, seed=i).fired for i, pool in enumerate(blends)) <= 2

    # a run trained before the gate kept a reference per hospital (its gate: the mixture's, a fallback chosen since)
    import torch

    from xsel.train.checkpoints import gate_payload
    from xsel.train.selector import recalibrate_gate

    trained = torch.load(tmp_path / "Source" / "selector.pt", weights_only=True)
    older = trained | gate_payload(dataclasses.replace(mixture, fallback="kcenter"))
    torch.save(older, tmp_path / "older.pt")
    again = SetSelector(recalibrate_gate(tmp_path / "older.pt", store, tmp_path / "again"))
    assert again.trust_gate.to_record() == {**grouped.to_record(), "fallback": "kcenter"}
    path = tmp_path / "hospitals.h5"
    write_store(path, embedding_chunks=[store.embeddings], paths=store.paths, meta=store.meta, attrs=store.attrs)
    result = cli("train", "selector", path, "--recalibrate-gate", tmp_path / "older.pt", "--out", tmp_path / "cli")
    assert result.exit_code == 0 and "Trust gate recalibrated: falls back to kcenter beyond MMD²" in result.output
    assert SetSelector(tmp_path / "cli" / "selector.pt").trust_gate.to_record() == again.trust_gate.to_record()
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.network.state_dict().values(), trained["state_dict"].values(), strict=True)
    )
    renamed = dataclasses.replace(store, meta=store.meta.assign(PatientID=[f"q{i}" for i in range(len(store))]))
    for other in (toy_store(500), renamed):  # another size; the same images, another split of the patients
        with pytest.raises(InputError, match="recalibrate on the store it was trained on"):
            recalibrate_gate(tmp_path / "older.pt", other, tmp_path / "other")


def test_the_fallback_is_chosen_on_another_store_and_the_weights_stay(trained, tmp_path):
    from xsel.train.selector import FALLBACK_CANDIDATES, choose_fallback
    from xsel.trust import KEEP_LEARNED

    store, checkpoint = trained
    other = toy_store(seed=1)  # another "hospital" with the same encoder
    choice = choose_fallback(checkpoint, other, tmp_path / "gated", conditions=["A"], episodes=6, show_progress=False)
    assert set(choice.auroc) == {*FALLBACK_CANDIDATES, KEEP_LEARNED}
    assert choice.fallback == max(choice.auroc, key=choice.auroc.get)
    original, chosen = load_checkpoint(checkpoint), load_checkpoint(choice.checkpoint)
    assert chosen["trust_gate"]["fallback"] == choice.fallback
    assert chosen["trust_gate"]["threshold"] == original["trust_gate"]["threshold"]
    assert chosen["fallback_validation"]["auroc"] == choice.auroc and chosen["fallback_validation"]["conditions"] == [
        "A"
    ]
    assert all(torch.equal(chosen["state_dict"][key], value) for key, value in original["state_dict"].items())
    assert SetSelector(choice.checkpoint).trust_gate.fallback == choice.fallback
    assert set(choice.margins) == set(choice.auroc) - {choice.fallback}
    assert chosen["fallback_validation"]["margins"] == choice.margins
    for name, margin in choice.margins.items():  # paired on the same episodes: the gap in mean AUROC, and its CI
        assert margin["diff"] == pytest.approx(choice.auroc[name] - choice.auroc[choice.fallback])
        assert margin["diff"] <= 0 and margin["low"] <= margin["diff"] <= margin["high"]
    assert choice.decided == (max(margin["high"] for margin in choice.margins.values()) < 0)
    assert choice.undecided == sorted(
        (name for name, margin in choice.margins.items() if margin["high"] >= 0),
        key=lambda name: -choice.margins[name]["diff"],
    )


def test_choose_fallback_needs_conditions_and_excludes_adapt(trained, demo_store, tmp_path, cli):
    _, checkpoint = trained
    base = ["train", "selector", demo_store, "--choose-fallback", checkpoint]
    missing = cli(*base, "--out", tmp_path / "a")
    assert missing.exit_code == 2 and "--choose-fallback needs --conditions" in missing.stderr
    both = cli(*base, "--adapt", checkpoint, "--conditions", "Edema", "--out", tmp_path / "b")
    assert both.exit_code == 2 and "one at a time" in both.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_fallback_is_refereed_leave_one_hospital_out(tmp_path, cli, capsys):
    from xsel.train.selector import FALLBACK_CANDIDATES
    from xsel.trust import KEEP_LEARNED

    store = toy_store(1000)
    hospital = np.array(["north", "south", "east", "west"]).repeat(250)
    store.meta["Source"] = hospital
    store.meta.loc[hospital == "west", ["A", "B"]] = 0.0  # west labels neither condition: it cannot referee
    path = tmp_path / "hospitals.h5"
    write_store(path, embedding_chunks=[store.embeddings], paths=store.paths, meta=store.meta, attrs=store.attrs)
    config = set_config(conditions=["A"], episodes_within="Source", episodes=16 * 2, val_every=2)
    train_selector(store, tmp_path / "run", config, show_progress=False)
    checkpoint = tmp_path / "run" / "selector.pt"
    capsys.readouterr()
    options = ["--max-minutes", "1", "--fallback-episodes", "4", "--out", tmp_path / "refereed", "--quiet"]
    result = cli("train", "selector", path, "--referee-away", checkpoint, *options)
    assert result.exit_code == 0, result.output
    chosen = load_checkpoint(tmp_path / "refereed" / "selector.pt")
    validation = chosen["fallback_validation"]
    assert validation["protocol"] == "leave-one-hospital-out" and validation["column"] == "Source"
    assert set(validation["hospitals"]) == {"north", "south", "east"} and "west (labels none" in result.stderr
    for held_out in ("north", "south", "east"):
        assert set(validation["hospitals"][held_out]) == {*FALLBACK_CANDIDATES, KEEP_LEARNED}
        trained_without = load_checkpoint(tmp_path / "refereed" / f"without-{held_out}" / "selector.pt")
        assert trained_without["store_rows"] == 750, "trained on the other hospitals' images alone"
    mean = {name: np.mean([h[name] for h in validation["hospitals"].values()]) for name in validation["auroc"]}
    assert validation["auroc"] == pytest.approx(mean)
    assert chosen["trust_gate"]["fallback"] == validation["chosen"] == max(mean, key=mean.get)
    margins = validation["margins"]
    close = [name for name in margins if margins[name]["high"] >= 0]  # not told apart from the chosen fallback
    shown = max(close or margins, key=lambda name: margins[name]["diff"])
    assert margins[shown]["diff"] == pytest.approx(mean[shown] - mean[validation["chosen"]])
    said = "not decided: " if close else "decided: runner-up "
    assert f"{said}{shown} {margins[shown]['diff']:+.3f}" in result.output
    assert f"Trust gate fallback: {validation['chosen']}" in result.stdout
    original = load_checkpoint(checkpoint)
    assert all(torch.equal(chosen["state_dict"][key], value) for key, value in original["state_dict"].items())

    mixed = tmp_path / "mixed"
    train_selector(store, mixed, set_config(conditions=["A"], episodes=16 * 2, val_every=2), show_progress=False)
    refused = cli("train", "selector", path, "--referee-away", mixed / "selector.pt", "--out", tmp_path / "no")
    assert refused.exit_code == 2 and "trained without --episodes-within" in refused.stderr
    assert not (tmp_path / "no").exists(), "nothing partial left behind"
    both = cli("train", "selector", path, "--referee-away", checkpoint, "--adapt", checkpoint, "--out", tmp_path / "x")
    assert both.exit_code == 2 and "one at a time" in both.stderr and not (tmp_path / "x").exists()


def test_a_hospital_labelling_every_validation_condition_referees_on_a_training_condition(tmp_path, capsys):
    """Without north, no hospital labels B (the run's validation condition): that sub-run validates on the
    training condition with the most positives among the others' images and trains on the rest."""
    from xsel.train.selector import referee_away

    store = toy_store(750)
    hospital = np.array(["north", "south", "east"]).repeat(250)
    store.meta["Source"] = hospital
    store.meta["C"] = store.meta["A"]
    store.meta.loc[hospital == "south", "C"] = 0.0  # fewer C than A positives without north
    store.meta.loc[hospital != "north", "B"] = 0.0  # B is labelled at north alone
    config = set_config(conditions=["A", "C"], episodes_within="Source", episodes=16 * 2, val_every=2)
    train_selector(store, tmp_path / "run", config, show_progress=False)
    capsys.readouterr()
    choice = referee_away(
        tmp_path / "run" / "selector.pt", store, tmp_path / "refereed", max_minutes=1, episodes=4, show_progress=False
    )
    assert "training condition with the most positives validates: A without north" in capsys.readouterr().err
    assert set(load_checkpoint(choice.checkpoint)["fallback_validation"]["hospitals"]) == {"north", "south", "east"}
    without_north = load_checkpoint(tmp_path / "refereed" / "without-north" / "selector.pt")["config"]
    assert without_north["val_conditions"] == ["A"] and without_north["conditions"] == ["C"]
    for held_out in ("south", "east"):  # north's B is among the others' images: the run's conditions as they were
        config_without = load_checkpoint(tmp_path / "refereed" / f"without-{held_out}" / "selector.pt")["config"]
        assert config_without["val_conditions"] == ["B"]


def test_the_selector_runs_a_large_pool_chunk_by_chunk_with_the_same_picks(trained, monkeypatch):
    import xsel.train.medselect as medselect

    store, checkpoint = trained
    selector = SetSelector(checkpoint)
    whole = selector.select_with_scores(store.embeddings[:200], 8, seed=0)
    monkeypatch.setattr(medselect, "LARGE_POOL_ROWS", 50)
    chunked = selector.select_with_scores(store.embeddings[:200], 8, seed=0)
    assert chunked[0].tolist() == whole[0].tolist() and np.allclose(chunked[1], whole[1], atol=1e-4)


@pytest.mark.parametrize(
    ("read_embedding", "rows", "k", "cache"),
    [(True, 300, 25, (32, 128, 16)), (False, 300, 25, (32, 128, 16)), (False, 120, 120, (8, 16, 1))],
)
def test_a_large_pool_runs_chunk_by_chunk_with_the_same_picks(read_embedding, rows, k, cache, monkeypatch):
    """Pools above LARGE_POOL_ROWS run forward_in_chunks (statistics first, then chunk by chunk, an online softmax in
    the attention summaries; each step over chunks of STEP_ROWS, its z-scores from running sums, the picks' cosines
    computed a few rows per pass): forward's picks, and its scores up to float rounding — also with every row picked
    and a budget of N (image, cosine) pairs, so computed rows are dropped and computed again."""
    for name, value in zip(("SPECULATE", "SPECULATED", "CACHED_PAIRS"), cache, strict=True):
        monkeypatch.setattr(setselect, name, value)
    monkeypatch.setattr(setselect, "STEP_ROWS", 29)
    passes, computed, compute = [], [], setselect._Cosines._compute

    def counted(cache, nearest, row, logits):
        before = set(cache.entries)
        compute(cache, nearest, row, logits)
        passes.append(row)
        computed.extend(set(cache.entries) - before)  # the rows this pass computed and kept

    monkeypatch.setattr(setselect._Cosines, "_compute", counted)
    torch.manual_seed(0)
    policy = SetPolicy(12, hidden=16, metadata=2, read_embedding=read_embedding).eval()
    pool = torch.randn(1, rows, 14) * torch.rand(1, rows, 1) * 3 + 0.5
    with torch.no_grad():
        scores, picks = policy(pool, torch.tensor(k))
        chunked_scores, chunked_picks = policy.forward_in_chunks(pool[0], k, chunk=37)
        assert policy.forward_in_chunks(pool[0], 0, chunk=37)[0].eq(0).all(), "no picks: every score 0, as forward"
    assert chunked_picks.tolist() == picks[0].tolist()
    assert 0 < len(passes) < k, "some picks come from rows computed alongside an earlier one"
    if cache[2] == 1:
        assert len(computed) > len(set(computed)), "within N pairs, rows are dropped and computed again"
    assert torch.allclose(chunked_scores, scores[0], atol=1e-4, rtol=1e-4)
