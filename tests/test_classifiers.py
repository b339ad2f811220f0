"""Few-shot classifiers: the formulas, missing classes, and that 0 is the natural threshold."""

from __future__ import annotations

import numpy as np
import pytest

from xsel import plugins

CLASSIFIERS = plugins.names("classifier")


def make(name):
    return plugins.get("classifier", name).factory()


def test_cosine_is_mean_similarity_to_positives_minus_negatives():
    train = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    labels = np.array([1, 1, 0])
    query = np.array([[2, 0], [0, 3]], dtype=np.float32)
    expected = [np.mean([1.0, 0.6]) - 0.0, np.mean([0.0, 0.8]) - 1.0]
    assert np.allclose(make("cosine").fit(train, labels).decision_function(query), expected, atol=1e-6)


def test_cosine_missing_class_contributes_zero():
    train = np.array([[1, 0], [0, 1]], dtype=np.float32)
    scores = make("cosine").fit(train, np.array([1, 1])).decision_function(np.array([[1, 0]], dtype=np.float32))
    assert np.allclose(scores, [0.5])


def test_prototype_is_nearest_centroid():
    train = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], dtype=np.float32)
    model = make("prototype").fit(train, np.array([1, 1, 0, 0]))
    assert (model.decision_function(np.array([[1, 0.05], [0.05, 1]], dtype=np.float32)) * [1, -1] > 0).all()


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_separable_classes_score_perfectly_and_threshold_at_zero(name):
    rng = np.random.default_rng(0)
    positives = rng.normal([3, 0, 0], 0.3, size=(10, 3))
    negatives = rng.normal([0, 3, 0], 0.3, size=(10, 3))
    train = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.array([1] * 10 + [0] * 10)
    query = np.concatenate([rng.normal([3, 0, 0], 0.3, (5, 3)), rng.normal([0, 3, 0], 0.3, (5, 3))]).astype(np.float32)
    scores = make(name).fit(train, labels).decision_function(query)
    assert scores.shape == (10,) and np.isfinite(scores).all()
    assert (scores[:5] > 0).all() and (scores[5:] < 0).all()


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [1]])
def test_one_class_only_still_scores(name, labels):
    train = np.random.default_rng(1).normal(size=(len(labels), 4)).astype(np.float32)
    scores = make(name).fit(train, np.array(labels)).decision_function(np.ones((6, 4), dtype=np.float32))
    assert scores.shape == (6,) and np.isfinite(scores).all()
