"""Built-in few-shot classifiers: fitted on the K labelled picks, they score the query set.

``fit(embeddings (K, D), labels (K,) in {0, 1})`` then ``decision_function(embeddings (M, D)) → (M,)``;
0 is each classifier's natural threshold (positive above it), used for F1 and Cohen's kappa. A class
missing from the K picks is handled explicitly, never by an exception.
"""

from __future__ import annotations

import numpy as np

from xsel import hookimpl
from xsel.geometry import squared_distances, unit_rows


class CosineClassifier:
    """MedSelect's classifier: mean cosine similarity to the picked positives minus to the picked
    negatives; a class with no picks contributes 0."""

    def fit(self, embeddings, labels):
        points, labels = unit_rows(embeddings), np.asarray(labels)
        dim = points.shape[1]
        self.positive_mean = points[labels == 1].mean(axis=0) if (labels == 1).any() else np.zeros(dim, np.float32)
        self.negative_mean = points[labels != 1].mean(axis=0) if (labels != 1).any() else np.zeros(dim, np.float32)
        return self

    def decision_function(self, embeddings):
        # mean of cosines = cosine against the mean of the unit vectors (unnormalised)
        return unit_rows(embeddings) @ (self.positive_mean - self.negative_mean)


class PrototypeClassifier:
    """Nearest centroid (prototypical networks): squared distance to the negative centroid minus to the
    positive one, on unit embeddings. With one class only, scores are its negated distance."""

    def fit(self, embeddings, labels):
        points, labels = unit_rows(embeddings), np.asarray(labels)
        self.centroids = {c: points[labels == c].mean(axis=0, keepdims=True) for c in (0, 1) if (labels == c).any()}
        return self

    def decision_function(self, embeddings):
        points = unit_rows(embeddings)
        distance = {c: squared_distances(points, centroid)[:, 0] for c, centroid in self.centroids.items()}
        if len(distance) == 2:
            return distance[0] - distance[1]
        return -distance[1] if 1 in distance else distance[0]


class KNNClassifier:
    """k nearest picks by cosine (k = min(5, K)), similarity-weighted vote; score = vote share − 0.5."""

    neighbours = 5

    def fit(self, embeddings, labels):
        self.points, self.labels = unit_rows(embeddings), np.asarray(labels, dtype=np.float64)
        return self

    def decision_function(self, embeddings):
        similarity = unit_rows(embeddings) @ self.points.T
        k = min(self.neighbours, len(self.labels))
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 0) + 1e-6
        votes = (weights * self.labels[nearest]).sum(axis=1) / weights.sum(axis=1)
        return votes - 0.5


class LogisticClassifier:
    """L2-regularised logistic regression on unit embeddings (C = 1, balanced class weights); with one
    class only it scores everything 0."""

    def fit(self, embeddings, labels):
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels)
        self.model = None
        if len(np.unique(labels)) == 2:
            self.model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
            self.model.fit(unit_rows(embeddings), labels)
        return self

    def decision_function(self, embeddings):
        if self.model is None:
            return np.zeros(len(embeddings))
        return self.model.decision_function(unit_rows(embeddings))


@hookimpl
def register_classifiers(register):
    register("cosine", CosineClassifier, description="MedSelect: mean cosine to positives − to negatives")
    register("prototype", PrototypeClassifier, description="nearest centroid (prototypical networks)")
    register("knn", KNNClassifier, description="similarity-weighted 5 nearest picks")
    register("logistic", LogisticClassifier, description="regularised logistic-regression probe")
