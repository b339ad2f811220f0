"""Selectors: the contract for every registered one, plus what each is meant to pick on clear geometry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.conftest import QUICK_EVALUATION
from xsel import plugins
from xsel.errors import InputError
from xsel.geometry import GEOMETRIES, geometry_rows, squared_distances
from xsel.selectors import create_selector, run_selector

# medselect and setselect need a checkpoint trained for a fixed embedding size: tests/test_medselect.py covers it;
# uncertainty and boostmis need a classifier: MODEL_SELECTORS, tested below with a toy one
MODEL_SELECTORS = ["uncertainty", "boostmis"]
HEURISTICS = ["kmedoids", "kcenter", "typiclust", "probcover"]  # each also a family NAME:<geometry>
# the geometry a plain name does not use, so every contract test covers both geometries of each heuristic
OTHER_GEOMETRY = [f"{h}:{g}" for h in HEURISTICS for g in GEOMETRIES if g != create_selector(h).geometry]
SELECTORS = [
    *(name for name in plugins.names("selector") if name not in ("medselect", "setselect", *MODEL_SELECTORS)),
    *OTHER_GEOMETRY,
]


def labelled(n: int, seed: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"label": np.random.default_rng(seed).integers(0, 2, n)})


def blobs(sizes=(40, 25, 15), dim=16, spread=0.05, seed=0):
    """Well-separated clusters on the unit sphere, and which cluster each row belongs to."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 3
    points = np.concatenate([c + spread * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes, strict=True)])
    return points.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def pick(name, embeddings, k, seed=0, metadata=None):
    metadata = labelled(len(embeddings)) if metadata is None else metadata
    return run_selector(create_selector(name), name, embeddings, k, seed=seed, metadata=metadata)


@pytest.mark.parametrize("name", SELECTORS)
def test_distinct_priority_order_and_deterministic(name):
    embeddings = np.random.default_rng(1).normal(size=(120, 24)).astype(np.float32)
    first = pick(name, embeddings, 15, seed=3)
    assert len(first) == 15 == len(set(first.tolist()))
    assert np.array_equal(first, pick(name, embeddings, 15, seed=3))


@pytest.mark.parametrize("name", [n for n in SELECTORS if not n.startswith("kcenter")])  # kcenter is seed-free
def test_seed_changes_the_choice(name):
    embeddings = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    assert any(
        not np.array_equal(pick(name, embeddings, 10, seed=0), pick(name, embeddings, 10, seed=s)) for s in (1, 2, 3)
    )


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_tiny_pools_and_k_above_n_select_everything(name, n):
    embeddings = np.random.default_rng(n).normal(size=(n, 5)).astype(np.float32)
    assert sorted(pick(name, embeddings, 10).tolist()) == list(range(n))


@pytest.mark.parametrize("name", SELECTORS)
def test_identical_embeddings_still_give_distinct_picks(name):
    embeddings = np.ones((30, 4), dtype=np.float32)
    assert len(set(pick(name, embeddings, 6).tolist())) == 6


@pytest.mark.parametrize("name", [*HEURISTICS, *OTHER_GEOMETRY])
def test_one_pick_per_well_separated_cluster(name):
    points, cluster = blobs()
    assert sorted(cluster[pick(name, points, 3)].tolist()) == [0, 1, 2]


def test_typiclust_picks_the_densest_point_of_each_cluster():
    points, cluster = blobs(sizes=(60, 60), spread=0.02)
    outlier_free = pick("typiclust", points, 2)
    for index in outlier_free:
        members = points[cluster == cluster[index]]
        distance_to_mean = np.linalg.norm(points[index] - members.mean(axis=0))
        typical = np.median(np.linalg.norm(members - members.mean(axis=0), axis=1))
        assert distance_to_mean < typical


def test_kmedoids_orders_the_largest_cluster_first():
    points, cluster = blobs(sizes=(10, 50, 20))
    assert cluster[pick("kmedoids", points, 3)].tolist() == [1, 2, 0]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kcenter_adds_the_farthest_point(geometry):
    points = np.array([[1, 0], [1, 0.01], [0.99, 0.02], [-1, 0.05], [0, 1]], dtype=np.float32)
    assert pick(f"kcenter:{geometry}", points, 2)[1] == 3


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kcenter_is_the_exact_greedy_k_center(geometry):
    """The lazy updates change nothing: every pick is (within float32 rounding) the row farthest from the picks so
    far, measured here the brute-force way in float64; rows share an offset, as ReLU features do."""
    rng = np.random.default_rng(0)
    points = (rng.normal(size=(600, 12)) * rng.uniform(0.5, 3, size=(600, 1)) + 4).astype(np.float32)
    picks = pick(f"kcenter:{geometry}", points, 60)
    rows = geometry_rows(points, geometry).astype(np.float64)
    assert picks[0] == np.argmin(((rows - rows.mean(axis=0)) ** 2).sum(axis=1)), "starts nearest the centre"
    nearest = ((rows - rows[picks[0]]) ** 2).sum(axis=1)
    for row in picks[1:]:
        assert nearest[row] >= nearest.max() * (1 - 1e-4)
        nearest = np.minimum(nearest, ((rows - rows[row]) ** 2).sum(axis=1))


@pytest.mark.parametrize("refresh", [1, 7, 512])
def test_kcenter_ties_and_lazy_refreshes_match_the_brute_force_greedy(monkeypatch, refresh):
    """Integer grid points: every distance exact in float32, ties everywhere. Whatever the refresh batch, the picks
    are the brute-force greedy's exactly (farthest from the picks so far, ties to the lowest row)."""
    from xsel_plugins import selectors

    monkeypatch.setattr(selectors, "REFRESH_BATCH", refresh)
    grid = np.stack(np.meshgrid(np.arange(-4, 5), np.arange(-3, 4), np.arange(-1, 2)), axis=-1).reshape(-1, 3)
    points = np.concatenate([grid, grid[::-1]]).astype(np.float32)  # each point twice; the mean is exactly 0
    rows = points.astype(np.float64)
    expected = [int(np.argmin((rows**2).sum(axis=1)))]
    nearest = ((rows - rows[expected[0]]) ** 2).sum(axis=1)
    for _ in range(39):
        nearest[expected] = -1.0
        expected.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((rows - rows[expected[-1]]) ** 2).sum(axis=1))
    assert pick("kcenter:euclidean", points, 40).tolist() == expected


def test_kcenter_refuses_non_finite_embeddings():
    points = np.random.default_rng(0).normal(size=(600, 4)).astype(np.float32)
    points[17, 2] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        pick("kcenter", points, 5)


@pytest.mark.parametrize("name", ["kcenter", "kcenter:cosine"])
def test_a_pool_read_whole_is_not_copied(name):
    """What kcenter allocates beside the pool stays well under the pool's own size (a million 512-d rows are 2 GB):
    no normalised or centred copy. The clustering heuristics work on samples (typiclust's is tested below)."""
    import tracemalloc

    embeddings = np.random.default_rng(0).normal(size=(60_000, 256)).astype(np.float32)
    tracemalloc.start()
    pick(name, embeddings, 50, metadata=pd.DataFrame(index=range(len(embeddings))))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * embeddings.nbytes, (
        f"{name}: {peak / 2**20:.1f} MiB for a {embeddings.nbytes / 2**20:.0f} MiB pool"
    )


def test_typiclust_clusters_a_sample_of_a_large_pool(monkeypatch):
    from xsel_plugins import selectors

    monkeypatch.setattr(selectors, "TYPICLUST_SAMPLE", 500)
    points, _ = blobs(sizes=(900, 700, 400))
    picks, reasons = create_selector("typiclust").select_with_reasons(points, 3, seed=0)
    assert len(set(picks.tolist())) == 3 and picks.max() < len(points)
    assert all("of a 500-image sample" in reason for reason in reasons)
    again, _ = create_selector("typiclust").select_with_reasons(points, 3, seed=0)
    assert again.tolist() == picks.tolist()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_probcover_radius_is_the_largest_with_95_percent_purity(geometry):
    from xsel_plugins.selectors import ProbCoverSelector, kmeans_labels

    rng = np.random.default_rng(0)
    points = geometry_rows(rng.normal(size=(300, 6)) * rng.uniform(0.5, 5, size=(300, 1)), geometry)
    clusters = kmeans_labels(points, 8, 0)
    delta = ProbCoverSelector.radius(points, clusters, geometry=geometry)
    distances = np.sqrt(((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(axis=2))

    def purity(radius):
        inside = distances <= radius
        return np.mean([np.all(clusters[inside[i]] == clusters[i]) for i in range(len(points))])

    assert purity(delta) >= 0.95
    assert purity(delta * 1.05) < 0.95 or purity(delta * 1.05) == purity(delta)


def test_probcover_never_repeats_after_everything_is_covered():
    points, _ = blobs(sizes=(5, 5), spread=0.001)
    picks = pick("probcover", points, 10)
    assert sorted(picks.tolist()) == list(range(10))


def test_squared_distances_in_each_geometry_match_the_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)) * 10 + 3, rng.normal(size=(4, 5))
    both = geometry_rows(np.concatenate([a, b]), "euclidean")
    exact = ((a[:, None] - b[None]) ** 2).sum(axis=2)
    assert np.allclose(squared_distances(both[:7], both[7:], "euclidean"), exact, rtol=1e-4)
    unit = geometry_rows(np.concatenate([a, b]), "cosine")
    cosine = 1 - (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    assert np.allclose(squared_distances(unit[:7], unit[7:], "cosine"), 2 * cosine, atol=1e-5)
    with pytest.raises(InputError, match="geometry 'manhattan' is not one of cosine, euclidean"):
        squared_distances(a, b, "manhattan")


def directions_and_norms(per_group=15, seed=0):
    """Four groups: two directions 0.3 rad apart × two norms (1 and 20). Cosine sees only the directions,
    Euclidean mostly the norms; returns the rows, each row's direction (0/1) and norm level (0/1)."""
    rng = np.random.default_rng(seed)
    directions = np.array([[1.0, 0.0, 0.0], [np.cos(0.3), np.sin(0.3), 0.0]])
    direction, level = np.repeat([0, 1, 0, 1], per_group), np.repeat([0, 0, 1, 1], per_group)
    rows = directions[direction] + rng.normal(scale=0.01, size=(len(direction), 3))
    return (rows * np.array([1.0, 20.0])[level, None]).astype(np.float32), direction, level


@pytest.mark.parametrize("heuristic", HEURISTICS)
def test_euclidean_follows_the_norm_where_cosine_follows_the_direction(heuristic):
    points, direction, level = directions_and_norms()
    cosine, euclidean = (pick(f"{heuristic}:{geometry}", points, 2) for geometry in GEOMETRIES)
    assert sorted(direction[cosine].tolist()) == [0, 1], "cosine: one pick per direction"
    assert sorted(level[euclidean].tolist()) == [0, 1], "Euclidean: one pick per norm"
    assert set(cosine.tolist()) != set(euclidean.tolist())
    rescaled = points * np.random.default_rng(1).uniform(0.1, 10, size=(len(points), 1)).astype(np.float32)
    assert np.array_equal(pick(f"{heuristic}:cosine", rescaled, 2), cosine), "cosine ignores every norm"


@pytest.mark.parametrize("heuristic", HEURISTICS)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_reasons_name_the_geometry(heuristic, geometry):
    points, _, _ = directions_and_norms()
    picks, reasons = create_selector(f"{heuristic}:{geometry}").select_with_reasons(points, 6, seed=0)
    distance = {"cosine": "cosine distance", "euclidean": "Euclidean distance"}[geometry]
    measured = reasons[1:] if heuristic == "kcenter" else reasons  # kcenter's first pick: nearest the centre
    assert len(reasons) == len(picks) == 6 and all(distance in reason for reason in measured), reasons


@pytest.mark.parametrize("heuristic", HEURISTICS)
def test_geometry_option_and_family_name_are_the_same_selector(heuristic):
    points, _, _ = directions_and_norms()
    by_option = run_selector(create_selector(heuristic, geometry="euclidean"), heuristic, points, 5, seed=4)
    assert np.array_equal(by_option, pick(f"{heuristic}:euclidean", points, 5, seed=4))
    assert create_selector(heuristic).geometry in GEOMETRIES
    assert plugins.get("selector", f"{heuristic}:euclidean").name == f"{heuristic}:euclidean"
    with pytest.raises(InputError, match="geometry 'manhattan' is not one of cosine, euclidean"):
        create_selector(f"{heuristic}:manhattan")
    with pytest.raises(InputError, match="geometry 'l1' is not one of"):
        create_selector(heuristic, geometry="l1")
    with pytest.raises(InputError, match="takes no geometry"):
        create_selector(f"{heuristic}:euclidean", geometry="cosine")


def test_the_cli_reaches_each_geometry(demo_store, tmp_path, cli):
    out = tmp_path / "picks.csv"
    result = cli("select", demo_store, "--k", "6", "--out", out, "--selector", "kcenter:euclidean")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert set(table["selector"]) == {"kcenter:euclidean"}
    assert table["reason"].iloc[1:].str.contains("Euclidean distance").all()
    specs = "typiclust:cosine,typiclust:euclidean,probcover:euclidean"
    result = cli(
        "evaluate", demo_store, "--conditions", "Edema", "--selectors", specs, "--out", tmp_path / "e",
        *QUICK_EVALUATION, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = {row["selector"] for row in json.loads(result.stdout)["summary"]}
    assert shown == {"random", *specs.split(",")}
    result = cli("select", demo_store, "--k", "6", "--out", tmp_path / "x.csv", "--selector", "kcenter:l2")
    assert result.exit_code != 0 and "geometry 'l2' is not one of cosine, euclidean" in result.output


def test_oracle_balanced_takes_half_of_each_class_and_fills_from_the_other():
    metadata = pd.DataFrame({"label": [1] * 3 + [0] * 30})
    embeddings = np.zeros((33, 2), dtype=np.float32)
    picks = pick("oracle-balanced", embeddings, 10, metadata=metadata)
    assert metadata["label"].to_numpy()[picks].sum() == 3
    metadata = pd.DataFrame({"label": [1] * 20 + [0] * 20})
    picks = pick("oracle-balanced", np.zeros((40, 2), np.float32), 10, metadata=metadata)
    assert metadata["label"].to_numpy()[picks].sum() == 5


@settings(max_examples=40, deadline=None)
@given(
    embeddings=st.integers(1, 40).flatmap(
        lambda n: arrays(np.float32, (n, 3), elements=st.floats(-5, 5, width=32, allow_subnormal=False))
    ),
    k=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_contract_holds_on_random_embeddings(embeddings, k, seed):
    for name in SELECTORS:
        picks = pick(name, embeddings, k, seed=seed)
        assert len(picks) == min(k, len(embeddings)) == len(set(picks.tolist()))


@pytest.mark.parametrize("name", SELECTORS)
def test_large_pool_path_uses_a_subsample_and_stays_within_the_pool(name):
    embeddings = np.random.default_rng(0).normal(size=(25_000, 32)).astype(np.float32)
    picks = pick(name, embeddings, 20, metadata=labelled(25_000))
    assert len(set(picks.tolist())) == 20 and picks.max() < 25_000


def toy_classifier(embeddings: np.ndarray, targets: np.ndarray, labels=("A",)):
    """An in-memory ``Classifier`` fitted on the given points (what active learning passes to selectors)."""
    from pathlib import Path

    from xsel.train.head import Classifier, fit_linear_head

    head = fit_linear_head(embeddings, np.asarray(targets, dtype=np.float32).reshape(len(embeddings), -1), epochs=100)
    return Classifier(
        path=Path("toy"), labels=list(labels), head=head, encoder_identity={"encoder": "toy"}, thresholds=[0.5]
    )


@pytest.fixture(scope="module")
def toy():
    """A 2-D problem and a linear classifier with logit 3·x₀ + 0.5 (decision boundary x₀ = −1/6)."""
    import torch

    points = np.random.default_rng(0).normal(size=(400, 2)).astype(np.float32)
    model = toy_classifier(points, points[:, 0] > 0)
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.head.linear.bias.fill_(0.5)
        model.head.input_mean.zero_()
        model.head.input_scale.fill_(1.0)
    return points, model


@pytest.mark.parametrize("name", MODEL_SELECTORS)
def test_model_selectors_keep_the_contract_and_are_deterministic(name, toy):
    points, model = toy
    selector = create_selector(name, model=model)
    first = run_selector(selector, name, points, 25, seed=3, metadata=None)
    assert len(set(first.tolist())) == 25
    assert np.array_equal(first, run_selector(create_selector(name, model=model), name, points, 25, seed=3))
    for n in (1, 2, 7):
        assert sorted(run_selector(selector, name, points[:n], 10, seed=0).tolist()) == list(range(n))
    duplicates = np.ones((30, 2), dtype=np.float32)
    assert len(set(run_selector(selector, name, duplicates, 6, seed=0).tolist())) == 6


def test_adversarial_score_is_finite_and_larger_near_the_decision_boundary(toy):
    points, model = toy
    selector = create_selector("boostmis", model=model)
    score = selector.adversarial_kl(points, seed=0)
    assert np.isfinite(score).all() and (score >= 0).all()
    probability = model.probabilities(points)[:, 0]
    near, far = np.abs(probability - 0.5) < 0.1, np.abs(probability - 0.5) > 0.4
    assert near.sum() > 10 and far.sum() > 10
    assert score[near].min() > score[far].max()
    far_away = np.array([[0.0, 0.0], [40.0, 0.0]], dtype=np.float32)  # a saturated prediction stays finite
    assert np.isfinite(selector.adversarial_kl(far_away, seed=0)).all()


def test_uncertainty_picks_the_points_nearest_p_one_half(toy):
    points, model = toy
    distance = np.abs(model.probabilities(points)[:, 0] - 0.5)
    for measure in ("entropy", "margin"):
        picks = run_selector(create_selector("uncertainty", model=model, measure=measure), "u", points, 10, seed=0)
        assert set(picks.tolist()) == set(np.argsort(distance)[:10].tolist())


def test_boostmis_takes_the_union_of_both_rankings(toy):
    points, model = toy
    selector = create_selector("boostmis", model=model)
    by_adversarial, by_uncertain = selector._positions(points, 0)
    picks = run_selector(selector, "boostmis", points, 6, seed=0)
    assert set(np.flatnonzero(by_adversarial < 3)) | set(np.flatnonzero(by_uncertain < 3)) >= set(picks.tolist())
    assert np.minimum(by_adversarial, by_uncertain)[picks].max() <= 5


@pytest.mark.parametrize("name", MODEL_SELECTORS)
def test_select_with_scores_matches_select_and_scores(name, toy):
    points, model = toy
    selector = create_selector(name, model=model)
    picks, scores = selector.select_with_scores(points, 8, seed=2)
    assert np.array_equal(picks, run_selector(selector, name, points, 8, seed=2))
    assert np.array_equal(scores, selector.scores(points, seed=2))


def test_binary_entropy_is_stable_at_extreme_logits():
    from xsel.train.uncertainty import binary_entropy

    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow below logit −709, no 0·log 0
        entropy = binary_entropy(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]))
    assert entropy[2] == pytest.approx(1.0) and np.all(entropy[[0, 4]] == 0) and np.all(entropy[[1, 3]] < 1e-15)


def test_density_weight_favours_dense_regions():
    from xsel.train.uncertainty import BoostMISSelector

    points, _ = blobs(sizes=(50, 5), spread=0.02)
    points[50:] += np.random.default_rng(1).normal(scale=0.5, size=(5, points.shape[1])).astype(np.float32)
    model = toy_classifier(points, np.arange(55) % 2)
    density = BoostMISSelector(model=model).density(points, seed=0)
    assert density[:50].mean() > density[50:].mean() and density.max() == 1.0


def test_one_label_of_a_multilabel_classifier(toy):
    points, _ = toy
    model = toy_classifier(points, np.stack([points[:, 0] > 0, points[:, 1] > 1], axis=1), labels=("A", "B"))
    distance = np.abs(model.probabilities(points)[:, 1] - 0.5)
    picks = run_selector(create_selector("uncertainty", model=model, label="B"), "u", points, 5, seed=0)
    assert set(picks.tolist()) == set(np.argsort(distance)[:5].tolist())


def test_model_selectors_refuse_a_missing_model_and_bad_options(toy):
    from xsel.errors import InputError

    for name in MODEL_SELECTORS:
        with pytest.raises(InputError, match=f"{name} needs a trained classifier: add --model"):
            create_selector(name)
    with pytest.raises(InputError, match="choose one of entropy, margin"):
        create_selector("uncertainty", model=toy[1], measure="variance")
    with pytest.raises(InputError, match="takes no checkpoint"):
        create_selector("boostmis", model=toy[1], checkpoint="x.pt")


@pytest.mark.parametrize("name", MODEL_SELECTORS)
def test_model_selectors_on_a_large_pool(name):
    embeddings = np.random.default_rng(0).normal(size=(25_000, 32)).astype(np.float32)
    model = toy_classifier(embeddings[:500], embeddings[:500, 0] > 0)
    picks = run_selector(create_selector(name, model=model), name, embeddings, 20, seed=0)
    assert len(set(picks.tolist())) == 20 and picks.max() < 25_000
