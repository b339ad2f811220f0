"""``xsel store merge``: stores of one encoder embedded apart → one store, identity and paths checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import xsel.store as store_module
from xsel.errors import InputError
from xsel.io.table import file_sha256
from xsel.store import errors_path, merge_stores, read_store, write_store

IDENTITY = {"encoder": "pixels", "weights_sha256": "a" * 64, "preprocessing": {"image_size": 32, "channels": 1}}


def make_store(path, paths, meta: dict, *, seed=0, dim=8, errors=None, **attrs):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(len(paths), dim)).astype(np.float32)
    write_store(
        path,
        embedding_chunks=[embeddings],
        paths=list(paths),
        meta=pd.DataFrame(meta),
        attrs={**IDENTITY, "encoder_options": {"weights": "none"}, "source_csv_sha256": "c" * 64, **attrs},
    )
    if errors:
        pd.DataFrame({"Path": errors, "error": ["cannot decode image"] * len(errors)}).to_csv(
            errors_path(path), index=False
        )
    return embeddings


@pytest.fixture
def parts(tmp_path):
    a = make_store(
        tmp_path / "a.h5", ["x/1.png", "x/2.png", "x/3.png"], {"PatientID": ["p1", "p2", "p3"], "Age": [40.0, 50, 60]},
        errors=["x/bad.png"],
    )  # fmt: skip
    b = make_store(
        tmp_path / "b.h5", ["y/1.png", "y/2.png"], {"PatientID": ["p4", "p5"], "Edema": [1.0, 0.0]}, seed=1,
        errors=["y/bad.png"],
    )  # fmt: skip
    return tmp_path, a, b


def test_merge_concatenates_rows_and_unions_columns(parts, cli):
    folder, a, b = parts
    result = cli("store", "merge", folder / "a.h5", folder / "b.h5", "--out", folder / "all.h5")
    assert result.exit_code == 0, result.output
    assert "Merged 2 stores, 5 embeddings" in result.stdout
    merged = read_store(folder / "all.h5")
    np.testing.assert_array_equal(merged.embeddings, np.concatenate([a, b]))
    assert merged.paths == ["x/1.png", "x/2.png", "x/3.png", "y/1.png", "y/2.png"]
    assert list(merged.meta.columns) == ["PatientID", "Age", "Edema"]
    assert merged.meta["PatientID"].tolist() == ["p1", "p2", "p3", "p4", "p5"]
    np.testing.assert_array_equal(merged.meta["Age"], [40, 50, 60, np.nan, np.nan])
    np.testing.assert_array_equal(merged.meta["Edema"], [np.nan, np.nan, np.nan, 1, 0])
    assert merged.encoder_identity == read_store(folder / "a.h5").encoder_identity
    sources = merged.attrs["merged_from"]
    assert [s["sha256"] for s in sources] == [file_sha256(folder / "a.h5"), file_sha256(folder / "b.h5")]
    assert [s["rows"] for s in sources] == [3, 2] and "source_csv_sha256" not in merged.attrs
    assert pd.read_csv(errors_path(folder / "all.h5"))["Path"].tolist() == ["x/bad.png", "y/bad.png"]


def test_merge_streams_blocks(parts, monkeypatch):
    folder, _, _ = parts
    monkeypatch.setattr(store_module, "ROW_CHUNK", 2)
    real, blocks = store_module.write_store, []

    def recording(path, *, embedding_chunks, **kwargs):
        def chunks():
            for chunk in embedding_chunks:
                blocks.append(len(chunk))
                yield chunk

        return real(path, embedding_chunks=chunks(), **kwargs)

    monkeypatch.setattr(store_module, "write_store", recording)
    merge_stores([folder / "a.h5", folder / "b.h5"], folder / "all.h5")
    assert blocks == [2, 1, 2]


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"encoder": "resnet18"}, "resnet18"),
        ({"weights_sha256": "b" * 64}, "bbbbbbbbbbbb"),
        ({"preprocessing": {"image_size": 64, "channels": 1}}, "64"),
    ],
)
def test_stores_of_another_encoder_are_refused_naming_both(tmp_path, cli, change, shown):
    make_store(tmp_path / "a.h5", ["1.png"], {})
    make_store(tmp_path / "b.h5", ["2.png"], {}, **change)
    result = cli("store", "merge", tmp_path / "a.h5", tmp_path / "b.h5", "--out", tmp_path / "all.h5")
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "a.h5" in message and "b.h5" in message and shown in message and "pixels" in message
    assert not (tmp_path / "all.h5").exists()


def test_a_path_in_two_stores_is_refused(tmp_path):
    make_store(tmp_path / "a.h5", ["1.png", "2.png"], {})
    make_store(tmp_path / "b.h5", ["3.png", "2.png"], {})
    with pytest.raises(InputError, match=r"'2.png' is in both .*a\.h5 and .*b\.h5"):
        merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")


def test_differing_options_are_a_warning(tmp_path):
    make_store(tmp_path / "a.h5", ["1.png"], {})
    make_store(tmp_path / "b.h5", ["2.png"], {}, encoder_options={"weights": "none", "precision": "bf16"})
    result = merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "all.h5")
    assert len(result.warnings) == 1 and "bf16" in result.warnings[0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["a.h5", "--out", "all.h5"], "at least two stores"),
        (["a.h5", "a.h5", "--out", "all.h5"], "listed twice"),
        (["a.h5", "b.h5", "--out", "a.h5"], "is an input of this command"),
        (["a.h5", "b.h5", "--out", "exists.h5"], "pass --overwrite"),
        (["a.h5", "missing.h5", "--out", "all.h5"], "embedding store not found"),
        (["a.h5", "junk.h5", "--out", "all.h5"], "not a readable HDF5"),
    ],
)
def test_bad_merges_are_input_errors(parts, cli, arguments, message):
    folder, _, _ = parts
    (folder / "exists.h5").write_text("old")
    (folder / "junk.h5").write_text("junk")
    result = cli("store", "merge", *[a if a.startswith("--") else folder / a for a in arguments])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert (folder / "exists.h5").read_text() == "old"


def test_overwrite_replaces_an_existing_store(parts):
    folder, _, _ = parts
    (folder / "all.h5").write_bytes((folder / "a.h5").read_bytes())  # --overwrite replaces only an xsel store
    merge_stores([folder / "a.h5", folder / "b.h5"], folder / "all.h5", overwrite=True)
    assert len(read_store(folder / "all.h5")) == 5


def test_a_subset_keeps_rows_paths_and_meta_aligned():
    from xsel.store import Store

    meta = pd.DataFrame({"PatientID": [f"p{i}" for i in range(6)], "Source": list("aabbcc")})
    store = Store("s.h5", np.arange(12, dtype=np.float32).reshape(6, 2), [f"{i}.png" for i in range(6)], meta, {"x": 1})
    by_mask = store.subset(store.meta["Source"].eq("b").to_numpy())
    by_rows = store.subset(np.array([2, 3]))
    for part in (by_mask, by_rows):
        assert part.paths == ["2.png", "3.png"] and part.embeddings[:, 0].tolist() == [4.0, 6.0]
        assert part.meta["PatientID"].tolist() == ["p2", "p3"] and part.meta.index.tolist() == [0, 1]
        assert part.attrs == {"x": 1} and len(store) == 6
