"""Labels (CheXpert, NIH) and the episode sampler of the evaluation protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xsel.episodes import EpisodeTask
from xsel.errors import InputError
from xsel.labels import available_conditions, condition_labels
from xsel.store import Store, read_store


def test_uncertain_policy():
    meta = pd.DataFrame({"Edema": [1, 0, -1, np.nan]})
    assert np.array_equal(condition_labels(meta, "Edema"), [1, 0, 1, np.nan], equal_nan=True)
    assert np.array_equal(condition_labels(meta, "Edema", uncertain="negative"), [1, 0, 0, np.nan], equal_nan=True)
    assert np.array_equal(condition_labels(meta, "Edema", uncertain="ignore"), [1, 0, np.nan, np.nan], equal_nan=True)


def test_nih_finding_labels():
    meta = pd.DataFrame({"Finding Labels": ["Effusion|Mass", "No Finding", "Mass", None]})
    assert available_conditions(meta) == ["Effusion", "Mass", "No Finding"]
    assert np.array_equal(condition_labels(meta, "Mass"), [1, 0, 1, np.nan], equal_nan=True)
    assert np.array_equal(condition_labels(meta, "No Finding"), [0, 1, 0, np.nan], equal_nan=True)


def test_unknown_condition_lists_the_label_columns():
    meta = pd.DataFrame({"Edema": [1, 0], "Age": [30, 40], "Sex": ["F", "M"]})
    with pytest.raises(InputError, match="unknown condition 'Oedema'; label columns in this store: Edema$"):
        condition_labels(meta, "Oedema")


def test_store_without_labels_is_explained():
    with pytest.raises(InputError, match="carries no label columns"):
        condition_labels(pd.DataFrame({"Age": [1.5, 2.5]}), "Edema")


@pytest.fixture(scope="module")
def store(demo_store):
    return read_store(demo_store)


def test_episode_protocol(store):
    task = EpisodeTask(store, "Cardiomegaly", pool_size=50, query_size=30, k=10)
    episode = task.episode(0, seed=0)
    assert episode.query_labels.sum() == 15 and len(episode.query) == 30
    assert len(episode.pool) == 50 and episode.pool_labels.sum() <= 25 and task.warning is None
    patients = store.meta["PatientID"].to_numpy()
    assert not set(patients[episode.pool]) & set(patients[episode.query])
    assert len(set(patients[episode.pool])) == len(episode.pool), "one image per patient"
    assert np.all(np.diff(episode.pool) > 0), "pools are presented in store order"
    labels = condition_labels(store.meta, "Cardiomegaly")
    assert np.array_equal(labels[episode.pool] == 1, episode.pool_labels == 1)
    negatives = episode.pool[episode.pool_labels == 0]
    assert (condition_labels(store.meta, "No Finding")[negatives] == 1).all()


def test_episodes_are_reproducible_and_distinct(store):
    task = EpisodeTask(store, "Edema", pool_size=100, query_size=20, k=5)
    again = EpisodeTask(store, "Edema", pool_size=100, query_size=20, k=5)
    first, repeat, second = task.episode(3, 7), again.episode(3, 7), task.episode(4, 7)
    assert np.array_equal(first.pool, repeat.pool) and np.array_equal(first.query, repeat.query)
    assert first.seed == repeat.seed
    assert not np.array_equal(first.query, second.query)


def test_pool_is_capped_at_half_positive():
    n = 200
    meta = pd.DataFrame({"A": [1.0] * 150 + [0.0] * 50, "No Finding": [np.nan] * 150 + [1.0] * 50})
    fake = Store(path="mem", embeddings=np.zeros((n, 2), np.float32), paths=[str(i) for i in range(n)], meta=meta)
    task = EpisodeTask(fake, "A", pool_size=60, query_size=20, k=5)
    episode = task.episode(0, 0)
    assert episode.pool_labels.sum() == 30 and len(episode.pool) == 60


def test_scarce_condition_shrinks_with_a_warning_and_too_scarce_fails(store):
    task = EpisodeTask(store, "Nodule", pool_size=5000, query_size=400, k=5)
    assert task.warning and "asked 400" in task.warning and "asked 5000" in task.warning
    n = 30
    meta = pd.DataFrame({"A": [1.0] * 8 + [0.0] * 22, "No Finding": [np.nan] * 8 + [1.0] * 22})
    fake = Store(path="mem", embeddings=np.zeros((n, 2), np.float32), paths=[str(i) for i in range(n)], meta=meta)
    with pytest.raises(InputError, match="has 8 positive and 22 negative"):
        EpisodeTask(fake, "A", k=5)
    meta = pd.DataFrame({"A": [1.0] * 12 + [0.0] * 12, "No Finding": [np.nan] * 12 + [1.0] * 12})
    fake = Store(path="mem", embeddings=np.zeros((24, 2), np.float32), paths=[str(i) for i in range(24)], meta=meta)
    with pytest.raises(InputError, match="fewer than K=20"):
        EpisodeTask(fake, "A", query_size=10, k=20)
