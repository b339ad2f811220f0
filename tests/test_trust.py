"""The trust gate: a learned selector falls back to a heuristic on pools unlike its training pools, alike on the
workstation (select, evaluate, verify) and at a site (bundle, no torch), and says so."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import QUICK_EVALUATION
from tests.test_export import TinyLearnedSelector
from xsel import hookimpl, plugins
from xsel.bundle import TRUST_FILE, Bundle
from xsel.errors import InputError
from xsel.evaluate import evaluate
from xsel.io.table import file_sha256
from xsel.selection import select
from xsel.site import site_select
from xsel.store import read_store
from xsel.trust import CLUSTERS, KEEP_LEARNED, MIXTURE, STATISTIC, TrustGate, calibrate_gate

DIM = 32


def draw(
    rows: int, seed: int, *, shift: float = 0.0, subspace: int | None = None, centres: tuple[int, ...] = (0, 1, 2, 3, 4)
) -> np.ndarray:
    """Synthetic embeddings: five clusters in a fixed 8-d subspace of R^32 plus noise (typical norm ≈ 7.5).
    ``shift`` moves every row along a fixed direction; ``subspace`` draws the clusters in another random subspace;
    ``centres`` draws from these clusters alone (a labelling pool: one finding's images)."""
    fixed = np.random.default_rng(99)
    basis = fixed.normal(size=(8, DIM)) / np.sqrt(DIM)
    means = fixed.normal(size=(5, 8)) * 2
    offset = fixed.normal(size=DIM)
    offset /= np.linalg.norm(offset)
    if subspace is not None:
        basis = np.random.default_rng(subspace).normal(size=(8, DIM)) / np.sqrt(DIM)
    rng = np.random.default_rng(seed)
    latent = means[rng.choice(centres, rows)] + rng.normal(size=(rows, 8))
    noise = 1.2 * rng.normal(size=(rows, DIM)) / np.sqrt(DIM)
    return (latent @ basis + noise + shift * offset).astype(np.float32)


@pytest.fixture(scope="module")
def gate() -> TrustGate:
    return calibrate_gate(draw(3000, 0), [draw(200, 100 + i) for i in range(40)], fallback="kcenter", quantile=0.95)


def fire_rate(gate: TrustGate, **shift) -> float:
    return float(np.mean([gate.check(draw(200, 1000 + i, **shift), seed=i).fired for i in range(50)]))


def test_quiet_on_pools_like_the_training_ones(gate):
    assert fire_rate(gate) <= 0.12  # calibrated at the 95th percentile: about 5% by chance


@pytest.mark.parametrize("shift", [{"shift": 2.0}, {"subspace": 7}], ids=["offset", "other subspace"])
def test_fires_on_shifted_pools(gate, shift):
    assert fire_rate(gate, **shift) >= 0.95


def test_the_threshold_is_the_asked_quantile_of_the_held_out_pools():
    pools = [draw(150, 200 + i) for i in range(30)]
    made = calibrate_gate(draw(1000, 1), pools, fallback="typiclust", quantile=0.9, reference_size=300)
    statistics = [made.statistic(pool, seed=0) for pool in pools]  # pools of pool_size: no subsample, seed unused
    assert made.threshold == pytest.approx(np.quantile(statistics, 0.9), rel=1e-12)
    assert made.pool_size == 150 and made.reference.shape == (300, DIM) and made.reference.dtype == np.float32
    assert made.groups == () and made.calibration["clusters"] == 1, "one hospital: its reference whole"
    assert np.allclose(np.linalg.norm(made.reference, axis=1), 1, atol=1e-5)
    assert made.calibration["quantile"] == 0.9 and made.calibration["pools"] == 30
    assert made.calibration["max"] == pytest.approx(max(statistics))
    assert made.calibration["median"] == pytest.approx(np.median(statistics))


def test_calibration_without_usable_pools_says_which():
    reference = draw(100, 3)
    with pytest.raises(InputError, match="training pools has none"):
        calibrate_gate(reference, [], fallback="kcenter")
    with pytest.raises(InputError, match="the smallest of 2 has 1"):
        calibrate_gate(reference, [draw(10, 4), draw(1, 5)], fallback="kcenter")
    with pytest.raises(InputError, match="Source=small has none"):
        calibrate_gate(reference, [draw(10, 4)], fallback="kcenter", groups={"Source=small": (reference, [])})


def test_a_large_pool_is_compared_on_a_seeded_subsample(gate):
    big = draw(100_000, 5)
    rows = gate.compared_rows(len(big), seed=3)
    expected = np.sort(np.random.default_rng(3).choice(len(big), gate.pool_size, replace=False))
    assert np.array_equal(rows, expected)
    value = gate.statistic(big, seed=3)
    assert value == gate.statistic(big[rows], seed=3)
    others = np.setdiff1d(np.arange(len(big)), rows)
    big[others] += 100.0  # rows outside the subsample are never read
    assert gate.statistic(big, seed=3) == value
    assert gate.check(big, seed=3).compared == gate.pool_size


def test_verdict_message_and_record(gate):
    verdict = gate.check(draw(200, 7, shift=3.0), seed=0)
    assert verdict.fired and verdict.fallback == "kcenter"
    assert "differs from the selector's training pools" in verdict.message and "--no-trust-gate" in verdict.message
    record = json.loads(json.dumps(verdict.to_record()))
    assert record["fired"] is True and record["statistic"] > record["threshold"] and record["gate"] == STATISTIC
    quiet = gate.check(draw(200, 8), seed=0)
    assert not quiet.fired and "resembles" in quiet.message


def test_record_round_trip_and_bad_records(gate):
    record = json.loads(json.dumps(gate.to_record()))
    assert "reference" not in record and record["reference_rows"] == len(gate.reference)
    again = TrustGate.from_record(record, gate.reference.copy())
    pool = draw(200, 9, shift=1.0)
    assert again.check(pool, seed=1) == gate.check(pool, seed=1)
    with pytest.raises(InputError, match="the reference is"):
        TrustGate.from_record(record, gate.reference[:10])
    with pytest.raises(InputError, match="statistic 'energy'"):
        TrustGate.from_record({**record, "statistic": "energy"}, gate.reference)
    with pytest.raises(InputError, match="lacks threshold"):
        TrustGate.from_record({k: v for k, v in record.items() if k != "threshold"}, gate.reference)
    with pytest.raises(InputError, match="compares 32-d rows"):
        gate.check(np.zeros((10, 5), np.float32), seed=0)


@pytest.fixture(scope="module")
def hospitals() -> tuple[TrustGate, TrustGate]:
    """Gates of a selector trained on a large hospital (the default subspace) and a small one (another subspace):
    the mixture alone, as training without ``--episodes-within`` calibrates it, and the mixture with a group per
    hospital. The mixture's reference and held-out pools are nine parts large hospital to one part small."""
    large, small = draw(2700, 0), draw(300, 1, subspace=7)
    mixture_pools = [np.concatenate([draw(180, 100 + i), draw(20, 200 + i, subspace=7)]) for i in range(40)]
    options = {"fallback": "kcenter", "quantile": 0.95, "reference_size": 200, "clusters": 1}  # hospitals alone
    alone = calibrate_gate(np.concatenate([large, small]), mixture_pools, **options)
    groups = {
        "Source=large": (large, [draw(200, 300 + i) for i in range(40)]),
        "Source=small": (small, [draw(200, 400 + i, subspace=7) for i in range(40)]),
    }
    grouped = calibrate_gate(np.concatenate([large, small]), mixture_pools, groups=groups, **options)
    return alone, grouped


def test_a_gate_per_hospital_is_quiet_on_a_small_training_hospital_and_still_fires_away(hospitals):
    alone, grouped = hospitals
    assert fire_rate(alone, subspace=7) >= 0.95, "the mixture alone takes the small hospital for another one"
    assert fire_rate(grouped, subspace=7) <= 0.12 and fire_rate(grouped) <= 0.12
    assert fire_rate(grouped, subspace=11) >= 0.95 and fire_rate(grouped, shift=2.0) >= 0.95
    small = grouped.check(draw(200, 5000, subspace=7), seed=0)
    assert small.nearest == "Source=small" and small.mix["Source=small"] > 0.9
    assert "nearest mix: 100% Source=small" in small.message
    away = grouped.check(draw(200, 5001, subspace=11), seed=0)
    assert away.fired and "differs from the selector's training pools (nearest mix" in away.message
    record = json.loads(json.dumps(away.to_record()))
    assert record["nearest"] == away.nearest and record["mix"] == away.mix
    assert np.array_equal(grouped.reference[: len(alone.reference)], alone.reference), "the same mixture reference"
    assert [g.rows for g in grouped.groups] == [200, 200]
    # each hospital's held-out pools, and the training pools', fire at most 1 − quantile of the time
    quantiles = grouped.calibration["quantiles"]
    assert set(quantiles) == {"training pools", "Source=large", "Source=small"}
    assert grouped.threshold == max(quantiles.values()) and grouped.calibration["pools"] == 120


def test_a_pool_blending_two_training_hospitals_is_home(hospitals):
    """Half one hospital, half the other: unlike each hospital alone and unlike the 9:1 training mixture, but a
    mixture of the training hospitals all the same (two repackagings of one archive looked foreign so)."""
    alone, grouped = hospitals
    blends = [np.concatenate([draw(100, 7000 + i), draw(100, 8000 + i, subspace=7)]) for i in range(30)]
    assert np.mean([alone.check(pool, seed=i).fired for i, pool in enumerate(blends)]) >= 0.9
    verdicts = [grouped.check(pool, seed=i) for i, pool in enumerate(blends)]
    assert np.mean([verdict.fired for verdict in verdicts]) <= 0.1
    # the small hospital's share of the nearest mixture, the 9:1 training pools counted by their parts: about half
    small = [v.mix.get("Source=small", 0.0) + 0.1 * v.mix.get("training pools", 0.0) for v in verdicts]
    assert 0.35 < np.mean(small) < 0.65


def test_one_reference_gives_the_plain_unbiased_mmd2():
    """The textbook U-statistic: within-sample kernel means without the diagonal, minus twice the cross mean."""
    gate = calibrate_gate(draw(3000, 0), [draw(200, 100 + i) for i in range(10)], fallback="kcenter")
    pool = draw(200, 9)
    x = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    y = gate.reference.astype(np.float64)

    def kernel(a, b):
        return np.exp(-((a[:, None, :] - b[None]) ** 2).sum(-1) / (2 * gate.bandwidth**2))

    kxx, kyy = kernel(x, x), kernel(y, y)
    expected = (kxx.sum() - np.trace(kxx)) / (200 * 199) + (kyy.sum() - np.trace(kyy)) / (len(y) * (len(y) - 1))
    # the gate's kernel reads ‖x − y‖² as 2 − 2 x·y of float32-stored unit rows: equal to rounding (~1e-7 of 0.5)
    assert gate.statistic(pool, seed=0) == pytest.approx(expected - 2 * kernel(x, y).mean(), abs=5e-7)
    assert abs(gate.statistic(pool, seed=0)) < 1e-3 < abs(gate.statistic(draw(200, 9, shift=2.0), seed=0))


def test_labelling_pools_lift_a_whole_reference_threshold_but_not_a_clustered_one():
    """A labelling pool holds one finding's images, a re-weighting of the training images' regions, and the gate is
    calibrated on such pools too (a user's pool is one). Against the reference whole they sit far from it and lift
    the threshold above a pool shifted off every region; against its k-means clusters they are home, and the shifted
    pool fires. Five clusters: the synthetic images' five regions."""
    options = {"fallback": "kcenter", "quantile": 0.95, "reference_size": 400}
    held_out = [draw(200, 100 + i) for i in range(20)]
    held_out += [draw(200, 200 + i, centres=(i % 5, (i + 2) % 5)) for i in range(20)]
    whole = calibrate_gate(draw(3000, 0), held_out, clusters=1, **options)
    split = calibrate_gate(draw(3000, 0), held_out, clusters=5, **options)
    assert fire_rate(whole, shift=2.0) <= 0.1 and fire_rate(whole, subspace=11) <= 0.1
    assert fire_rate(split, shift=2.0) >= 0.95 and fire_rate(split, subspace=11) >= 0.95
    labelling = [draw(200, 2000 + i, centres=(i % 5, (i + 1) % 5)) for i in range(30)]
    verdicts = [split.check(pool, seed=i) for i, pool in enumerate(labelling)]
    assert np.mean([verdict.fired for verdict in verdicts]) <= 0.1 and fire_rate(split) <= 0.1
    assert all(v.nearest == MIXTURE and set(v.mix) == {MIXTURE} for v in verdicts), "clusters count for their source"
    assert [group.name for group in split.groups] == [f"training pools (cluster {i} of 5)" for i in range(1, 6)]


@pytest.mark.parametrize("clusters", [0, True, 2.0, "4"])
def test_a_bad_cluster_count_is_refused(clusters):
    with pytest.raises(InputError, match="clusters .* must be an integer ≥ 1"):
        calibrate_gate(draw(100, 0), [draw(50, 1), draw(50, 2)], fallback="kcenter", clusters=clusters)


def test_each_training_hospital_is_split_into_clusters():
    large, small = draw(2700, 0), draw(300, 1, subspace=7)
    groups = {
        "Source=large": (large, [draw(200, 300 + i) for i in range(20)]),
        "Source=small": (small, [draw(200, 400 + i, subspace=7) for i in range(20)]),
    }
    gate = calibrate_gate(
        np.concatenate([large, small]),
        [draw(200, 500 + i) for i in range(20)],
        fallback="kcenter",
        groups=groups,
        seed=2**40,  # any seed: k-means takes it modulo 2³²
    )
    sources = [group.source for group in gate.groups]
    assert sources == sorted(sources) and set(sources) == set(groups) and len(sources) == 2 * CLUSTERS
    assert {s: sum(g.rows for g in gate.groups if g.source == s) for s in groups} == {s: 500 for s in groups} | {
        "Source=small": 300
    }
    verdict = gate.check(draw(200, 5000, subspace=7), seed=0)
    assert not verdict.fired and verdict.nearest == "Source=small" and verdict.mix["Source=small"] > 0.9
    assert f"nearest mix: {verdict.mix['Source=small']:.0%} Source=small" in verdict.message
    record = json.loads(json.dumps(gate.to_record()))
    assert {group["of"] for group in record["groups"]} == set(groups)
    assert TrustGate.from_record(record, gate.reference.copy()).check(draw(200, 1, shift=2.0), seed=1) == gate.check(
        draw(200, 1, shift=2.0), seed=1
    )


def test_a_grouped_gate_round_trips_and_a_bad_group_is_refused(hospitals):
    _, grouped = hospitals
    record = json.loads(json.dumps(grouped.to_record()))
    assert [g["name"] for g in record["groups"]] == ["Source=large", "Source=small"]
    again = TrustGate.from_record(record, grouped.reference.copy())
    for pool in (draw(200, 6000, subspace=7), draw(200, 6001, subspace=11)):
        assert again.check(pool, seed=2) == grouped.check(pool, seed=2)
    with pytest.raises(InputError, match="at least 2 must remain"):
        TrustGate.from_record({**record, "reference_rows": 400}, grouped.reference[-400:])
    with pytest.raises(InputError, match="a group of its record is malformed"):
        TrustGate.from_record({**record, "groups": [{"name": "x"}]}, grouped.reference)
    with pytest.raises(InputError, match="threshold per training hospital.*--recalibrate-gate"):
        TrustGate.from_record(  # as an earlier xsel recorded a grouped gate
            {**record, "groups": [{**group, "threshold": 0.01, "bandwidth": 0.8} for group in record["groups"]]},
            grouped.reference,
        )


@pytest.mark.parametrize(
    ("fallback", "message"),
    [("medselect", "needs a checkpoint"), ("oracle-balanced", "picks with the labels"), ("nope", "nope")],
)
def test_the_fallback_must_be_a_heuristic(fallback, message):
    with pytest.raises(InputError, match=message):
        calibrate_gate(draw(100, 0), [draw(50, 1), draw(50, 2)], fallback=fallback)


def test_a_checkpoint_carries_the_gate(gate, tmp_path):
    import torch

    from xsel.train.checkpoints import gate_from_payload, gate_payload

    torch.save({"format": 1, **gate_payload(gate)}, tmp_path / "selector.pt")
    loaded = gate_from_payload(torch.load(tmp_path / "selector.pt", weights_only=True))
    assert np.array_equal(loaded.reference, gate.reference) and loaded.to_record() == gate.to_record()
    assert gate_payload(None) == {} and gate_from_payload({"format": 1}) is None


# --- the gate in selection, evaluation and at a site: a tiny learned plugin carrying a gate ---


def foreign_gate(dim: int) -> TrustGate:
    """A gate calibrated on Gaussian embeddings: every pool of the demo store lies far from them."""
    rng = np.random.default_rng(0)
    return calibrate_gate(
        rng.normal(size=(400, dim)), [rng.normal(size=(80, dim)) for _ in range(10)], fallback="kcenter"
    )


def home_gate(store_path) -> TrustGate:
    """A gate calibrated on the demo store itself (reference: one half, held-out pools: the other)."""
    embeddings = read_store(store_path).embeddings
    rng = np.random.default_rng(1)
    half = len(embeddings) // 2
    pools = [embeddings[half + rng.choice(len(embeddings) - half, 80, replace=False)] for _ in range(10)]
    return calibrate_gate(embeddings[:half], pools, fallback="kcenter", quantile=1.0)


@pytest.fixture
def gated_plugin(demo_store):
    """Registers ``tiny-gated``, the test's linear learned selector with a gate; ``use(gate)`` chooses the gate."""
    chosen = {"gate": foreign_gate(read_store(demo_store).embeddings.shape[1])}

    def factory(checkpoint=None):
        selector = TinyLearnedSelector(checkpoint)
        selector.trust_gate = chosen["gate"]
        return selector

    class Plugin:
        @hookimpl
        def register_selectors(self, register):
            register("tiny-gated", factory, description="test: a linear learned selector with a trust gate")

    plugins.register_plugin(Plugin(), name="tiny-gated-plugin")
    try:
        yield chosen
    finally:
        plugins.unregister_plugin("tiny-gated-plugin")


def test_selection_falls_back_and_the_certificate_records_it(gated_plugin, demo_store, tmp_path, cli):
    out = tmp_path / "s.csv"
    args = ["select", demo_store, "--k", "6", "--out", out, "--selector", "tiny-gated", "--checkpoint", demo_store]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "fell back to kcenter" in result.stderr
    heuristic = select(demo_store, 6, selector="kcenter")
    picked = pd.read_csv(out)
    assert picked["Path"].tolist() == heuristic.table["Path"].tolist() and set(picked["selector"]) == {"kcenter"}
    certificate = json.loads((tmp_path / "s.SELECTION.json").read_text())
    assert certificate["selector"]["name"] == "tiny-gated" and certificate["selector"]["options"]["trust_gate"]
    fallback = certificate["fallback"]
    assert fallback["fired"] and fallback["fallback"] == "kcenter" and fallback["statistic"] > fallback["threshold"]
    assert any("fell back to kcenter" in warning for warning in certificate["warnings"])
    verified = cli("select", "--verify", tmp_path / "s.SELECTION.json", "-q")
    assert verified.exit_code == 0 and "all 6 picks were reproduced" in verified.stdout, verified.output


def test_no_trust_gate_runs_the_learned_selector(gated_plugin, demo_store, tmp_path, cli):
    out = tmp_path / "s.csv"
    args = ["select", demo_store, "--k", "6", "--out", out, "--selector", "tiny-gated", "--checkpoint", demo_store]
    result = cli(*args, "--no-trust-gate")
    assert result.exit_code == 0, result.output
    assert "fell back" not in result.stderr
    learned = select(demo_store, 6, selector="tiny-gated", checkpoint=demo_store, trust_gate=False)
    picked = pd.read_csv(out)
    assert picked["Path"].tolist() == learned.table["Path"].tolist() and set(picked["selector"]) == {"tiny-gated"}
    certificate = json.loads((tmp_path / "s.SELECTION.json").read_text())
    assert certificate["fallback"] is None and certificate["selector"]["options"]["trust_gate"] is False
    verified = cli("select", "--verify", tmp_path / "s.SELECTION.json", "-q")  # the setting is honoured
    assert verified.exit_code == 0, verified.output


def test_a_quiet_gate_keeps_the_learned_selector_and_records_its_verdict(gated_plugin, demo_store):
    gated_plugin["gate"] = home_gate(demo_store)
    result = select(demo_store, 6, selector="tiny-gated", checkpoint=demo_store)
    assert set(result.table["selector"]) == {"tiny-gated"}
    assert result.record["fallback"]["fired"] is False
    assert result.record["fallback"]["statistic"] <= result.record["fallback"]["threshold"]
    assert not any("trust gate" in warning for warning in result.warnings)


def test_constraints_apply_to_the_fallback(gated_plugin, demo_store):
    from xsel.constraints import Constraints

    constraints = Constraints(balance=("Sex",))
    gated = select(demo_store, 8, selector="tiny-gated", checkpoint=demo_store, constraints=constraints)
    heuristic = select(demo_store, 8, selector="kcenter", constraints=constraints)
    assert gated.table["Path"].tolist() == heuristic.table["Path"].tolist() and gated.record["strata"]


def test_a_gate_of_another_dimension_is_a_one_line_input_error(gated_plugin, demo_store):
    gated_plugin["gate"] = foreign_gate(16)
    with pytest.raises(InputError, match="the gate compares 16-d rows"):
        select(demo_store, 6, selector="tiny-gated", checkpoint=demo_store)


def test_evaluation_marks_and_counts_fallbacks(gated_plugin, demo_store):
    options = {"k": (5,), "episodes": 3, "pool_size": 60, "query_size": 20, "show_progress": False}
    specs = ["random", "kcenter", f"tiny-gated={demo_store}"]
    result = evaluate(demo_store, ["Cardiomegaly"], selectors=specs, **options)
    table = result.episodes
    mine, heuristic = (table[table["selector"] == name].reset_index() for name in ("tiny-gated", "kcenter"))
    assert mine["fell_back"].astype(bool).all() and table.loc[table["selector"] == "random", "fell_back"].isna().all()
    assert np.allclose(mine["auroc"], heuristic["auroc"])  # the fallback picked: the same labels, the same scores
    assert result.settings["trust_gate"]
    assert result.settings["fell_back"]["tiny-gated"] == {"Cardiomegaly": {"fired": 3, "fell_back": 3, "episodes": 3}}
    line = "trust gate of tiny-gated: fell back to kcenter in 3/3 episodes of Cardiomegaly"
    assert any(line in warning for warning in result.warnings)
    off = evaluate(demo_store, ["Cardiomegaly"], selectors=specs, trust_gate=False, **options)
    assert "fell_back" not in off.episodes.columns and not off.settings["trust_gate"]


def test_a_gate_whose_fallback_is_the_learned_selector_reports_the_pool_and_keeps_picking(gated_plugin, demo_store):
    """A fallback chosen on another hospital may be the learned selector itself: the gate still says the pool is
    unlike the training pools (record, warning, evaluate's counts), and the learned selector picks."""
    from dataclasses import replace

    gated_plugin["gate"] = replace(foreign_gate(read_store(demo_store).embeddings.shape[1]), fallback=KEEP_LEARNED)
    kept = select(demo_store, 6, selector="tiny-gated", checkpoint=demo_store)
    learned = select(demo_store, 6, selector="tiny-gated", checkpoint=demo_store, trust_gate=False)
    assert kept.table["Path"].tolist() == learned.table["Path"].tolist() and set(kept.table["selector"]) == {
        "tiny-gated"
    }
    record = kept.record["fallback"]
    assert record["fired"] and not record["fell_back"] and record["fallback"] == KEEP_LEARNED
    assert any("picked all the same" in warning for warning in kept.warnings)
    options = {"k": (5,), "episodes": 3, "pool_size": 60, "query_size": 20, "show_progress": False}
    result = evaluate(demo_store, ["Cardiomegaly"], selectors=["random", f"tiny-gated={demo_store}"], **options)
    assert not result.episodes.loc[result.episodes["selector"] == "tiny-gated", "fell_back"].astype(bool).any()
    assert result.settings["fell_back"]["tiny-gated"] == {"Cardiomegaly": {"fired": 3, "fell_back": 0, "episodes": 3}}
    assert any("pools unlike its training pools in 3/3 episodes" in warning for warning in result.warnings)


def test_evaluate_cli_reports_fallbacks(gated_plugin, demo_store, tmp_path, cli):
    args = ["evaluate", demo_store, "--conditions", "Cardiomegaly", "--selectors", f"tiny-gated={demo_store}"]
    result = cli(*args, "--out", tmp_path / "on", *QUICK_EVALUATION)
    assert result.exit_code == 0 and "fell back to kcenter in 3/3 episodes of Cardiomegaly" in result.stderr
    assert pd.read_csv(tmp_path / "on" / "episodes.csv")["fell_back"].notna().sum() == 3
    off = cli(*args, "--out", tmp_path / "off", "--no-trust-gate", *QUICK_EVALUATION)
    assert off.exit_code == 0 and "fell back" not in off.stderr, off.output
    rounds = cli(*args, "--out", tmp_path / "al", "--rounds", "1", "--no-trust-gate", *QUICK_EVALUATION)
    assert rounds.exit_code == 2 and "--trust-gate applies to selector comparisons" in rounds.stderr


@pytest.fixture
def gated_bundle(gated_plugin, demo_store, tmp_path):
    from xsel.train.export import export_bundle

    manifest = export_bundle(tmp_path / "bundle", encoder="pixels", selector=f"tiny-gated={demo_store}")
    return tmp_path / "bundle", manifest


def test_the_site_falls_back_as_the_workstation_does(gated_bundle, demo_store, tmp_path, cli):
    bundle, manifest = gated_bundle
    assert manifest["selector"]["trust_gate"]["fallback"] == "kcenter" and TRUST_FILE in manifest["sha256"]
    assert Bundle.load(bundle).trust_gate.threshold == pytest.approx(manifest["selector"]["trust_gate"]["threshold"])
    csv = demo_store.parent / "labels.csv"
    for trust_gate in (True, False):
        site = site_select(csv, bundle, 7, out=tmp_path / "s.csv", show_progress=False, trust_gate=trust_gate)
        workstation = select(demo_store, 7, selector="tiny-gated", checkpoint=demo_store, trust_gate=trust_gate)
        assert site.table["Path"].tolist() == workstation.table["Path"].tolist()
        assert site.table["selector"].tolist() == workstation.table["selector"].tolist()
        assert (site.record["fallback"] or {}).get("fired") == (workstation.record["fallback"] or {}).get("fired")
    assert set(site.table["selector"]) == {"tiny-gated"} and site.record["fallback"] is None  # the last: gate off
    result = cli("select", csv, "--bundle", bundle, "--k", "7", "--out", tmp_path / "c.csv", "-q")
    assert result.exit_code == 0 and "fell back to kcenter" in result.stderr, result.output
    certificate = json.loads((tmp_path / "c.SELECTION.json").read_text())
    assert certificate["fallback"]["fired"] and certificate["selector"]["options"]["trust_gate"] is True
    verified = cli("select", "--verify", tmp_path / "c.SELECTION.json", "-q")
    assert verified.exit_code == 0 and "all 7 picks were reproduced" in verified.stdout, verified.output


def test_a_gate_per_hospital_travels_in_the_bundle(gated_plugin, demo_store, tmp_path):
    """A gate whose mixture takes the demo store for foreign but one of whose hospitals is the demo store: exported,
    the site reads the same gate and, like the workstation, keeps the learned selector, naming that hospital."""
    from xsel.train.export import export_bundle

    embeddings = read_store(demo_store).embeddings
    rng = np.random.default_rng(0)
    half, dim = len(embeddings) // 2, embeddings.shape[1]
    home = [embeddings[half + rng.choice(len(embeddings) - half, 80, replace=False)] for _ in range(10)]
    gate = calibrate_gate(
        rng.normal(size=(400, dim)),
        [rng.normal(size=(80, dim)) for _ in range(10)],
        fallback="kcenter",
        quantile=1.0,
        groups={"Source=demo": (embeddings[:half], home)},
    )
    gated_plugin["gate"] = gate
    manifest = export_bundle(tmp_path / "bundle", encoder="pixels", selector=f"tiny-gated={demo_store}")
    assert {group["of"] for group in manifest["selector"]["trust_gate"]["groups"]} == {"Source=demo"}  # its clusters
    loaded = Bundle.load(tmp_path / "bundle").trust_gate
    assert loaded.to_record() == gate.to_record() and np.array_equal(loaded.reference, gate.reference)
    site = site_select(
        demo_store.parent / "labels.csv", tmp_path / "bundle", 7, out=tmp_path / "s.csv", show_progress=False
    )
    workstation = select(demo_store, 7, selector="tiny-gated", checkpoint=demo_store)
    assert site.table["Path"].tolist() == workstation.table["Path"].tolist()
    assert set(site.table["selector"]) == {"tiny-gated"}
    for record in (site.record["fallback"], workstation.record["fallback"]):
        assert record["fired"] is False and record["nearest"] == "Source=demo"


def test_a_tampered_trust_reference_is_refused(gated_bundle, tmp_path):
    bundle = tmp_path / "copy"
    shutil.copytree(gated_bundle[0], bundle)
    reference = np.load(bundle / TRUST_FILE)
    reference[0] = -reference[0]
    np.save(bundle / TRUST_FILE, reference)
    with pytest.raises(InputError, match="trust_reference.npy: SHA-256 does not match the manifest"):
        Bundle.load(bundle)


class _Planted:
    """An object whose unpickling would create a file: proof that loading never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_trust_reference_is_refused_without_running_it(gated_bundle, tmp_path, cli, demo_store):
    bundle, marker = tmp_path / "copy", tmp_path / "planted"
    shutil.copytree(gated_bundle[0], bundle)
    np.save(bundle / TRUST_FILE, np.array([_Planted(marker)], dtype=object), allow_pickle=True)
    assert b"planted" in (bundle / TRUST_FILE).read_bytes()  # a real pickle inside the .npy
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sha256"][TRUST_FILE] = file_sha256(bundle / TRUST_FILE)  # re-hashed: the hash alone would pass it
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    csv = demo_store.parent / "labels.csv"
    result = cli("select", csv, "--bundle", bundle, "--k", "3", "--out", tmp_path / "s.csv", "-q")
    assert result.exit_code == 2 and "trust_reference.npy: not a plain array" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
