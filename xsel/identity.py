"""Encoder identity: which encoder made a set of embeddings, so nothing reads them as another's.

Identity = (registered encoder name, SHA-256 of its loaded weights, preprocessing). A store keeps it in its
attributes, a bundle in its manifest, a selector or classifier checkpoint beside its weights; every check
compares these dicts and names both sides when they differ. ``source_csv_sha256`` is provenance, not identity.
"""

from __future__ import annotations

from collections.abc import Mapping

IDENTITY_KEYS = ("encoder", "weights_sha256", "preprocessing")


def encoder_identity(encoder: str, weights_sha256: str, preprocessing: dict) -> dict:
    """The identity dict, the one shape every store, bundle and checkpoint records."""
    return {"encoder": encoder, "weights_sha256": weights_sha256, "preprocessing": dict(preprocessing)}


def identity_of(record: Mapping) -> dict:
    """The identity held in a record that carries other keys too (store attributes, a job file)."""
    return {key: record.get(key) for key in IDENTITY_KEYS}


def describe_identity(identity: Mapping) -> str:
    """An encoder identity in words: name, the start of the weights hash, and the preprocessing."""
    weights = str(identity.get("weights_sha256"))[:12]
    return f"{identity.get('encoder')} (weights {weights}…, preprocessing {identity.get('preprocessing')})"
