"""`xsel select`: patient rule, --exclude, K above the pool, refusals, and the selection CSV."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from xsel.errors import InputError
from xsel.selection import select
from xsel.store import read_store


def test_selection_csv_columns_and_distinct_patients(demo_store, tmp_path, cli):
    out = tmp_path / "sel.csv"
    result = cli("select", demo_store, "--k", "25", "--out", out, "--selector", "kcenter")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns[:4]) == ["rank", "Path", "score", "selector"]
    assert table["rank"].tolist() == list(range(1, 26)) and set(table["selector"]) == {"kcenter"}
    assert table["PatientID"].is_unique
    store = read_store(demo_store)
    assert set(table["Path"]) <= set(store.paths)
    meta = store.meta.assign(Path=store.paths).set_index("Path")
    assert (meta.loc[table["Path"], "PatientID"].to_numpy() == table["PatientID"].to_numpy()).all()


def test_patient_rule_keeps_the_first_image_of_each_patient(demo_store):
    store = read_store(demo_store)
    everything = select(store, len(store), selector="random")
    first_rows = store.meta.reset_index().groupby("PatientID")["index"].min()
    assert sorted(everything.table["Path"]) == sorted(store.paths[i] for i in first_rows)
    assert any("one image per PatientID" in w for w in everything.warnings)
    allowed = select(store, len(store), selector="random", allow_same_patient=True)
    assert len(allowed.table) == len(store) and not allowed.table["PatientID"].is_unique


def test_exclude_removes_labelled_images(demo_store, tmp_path):
    first = select(demo_store, 30, selector="typiclust")
    first.table.to_csv(tmp_path / "round1.csv", index=False)
    second = select(demo_store, 30, selector="typiclust", exclude=tmp_path / "round1.csv")
    assert not set(first.table["Path"]) & set(second.table["Path"])


def test_exclude_removes_every_patient_already_labelled(demo_store, tmp_path):
    store = read_store(demo_store)
    repeat = store.meta["PatientID"].duplicated(keep=False)
    patient = store.meta.loc[repeat, "PatientID"].iloc[0]
    first = store.meta.index[store.meta["PatientID"] == patient][0]
    pd.DataFrame({"Path": [store.paths[first]]}).to_csv(tmp_path / "labelled.csv", index=False)
    everything = select(store, len(store), selector="random", exclude=tmp_path / "labelled.csv")
    assert patient not in set(everything.table["PatientID"]), "the patient's follow-up image is not offered again"


def test_checkpoint_with_a_baseline_and_negative_seed_are_input_errors(demo_store, tmp_path, cli):
    out = ["--out", str(tmp_path / "s.csv")]
    result = cli("select", demo_store, "--k", "2", *out, "--selector", "typiclust", "--checkpoint", tmp_path / "c.pt")
    assert result.exit_code == 2 and "takes no checkpoint" in result.stderr
    result = cli("select", demo_store, "--k", "2", *out, "--seed", "-1")
    assert result.exit_code == 2 and "greater than or equal to 0" in result.output


def test_same_seed_same_selection_other_seed_other(demo_store):
    a = select(demo_store, 15, selector="kmedoids", seed=4).table["Path"].tolist()
    assert a == select(demo_store, 15, selector="kmedoids", seed=4).table["Path"].tolist()
    assert a != select(demo_store, 15, selector="kmedoids", seed=5).table["Path"].tolist()


def test_k_above_the_pool_selects_everything_and_warns(demo_store, tmp_path, cli):
    result = cli("select", demo_store, "--k", "100000", "--out", tmp_path / "all.csv", "--selector", "random")
    assert result.exit_code == 0
    assert "larger than the pool" in result.stderr
    assert len(pd.read_csv(tmp_path / "all.csv")) == read_store(demo_store).meta["PatientID"].nunique()


def test_store_without_meta_still_selects(tmp_path):
    with h5py.File(tmp_path / "bare.h5", "w") as handle:
        handle["embeddings"] = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
        handle.create_dataset("paths", data=[f"{i}.png" for i in range(50)], dtype=h5py.string_dtype())
        handle.attrs["schema_version"] = 1
    assert len(select(tmp_path / "bare.h5", 5).table) == 5


def _nan_store(tmp_path):
    with h5py.File(tmp_path / "nan.h5", "w") as handle:
        data = np.ones((4, 3), dtype=np.float32)
        data[2, 1] = np.nan
        handle["embeddings"] = data
        handle.create_dataset("paths", data=["a", "b", "c", "d"], dtype=h5py.string_dtype())
        handle.attrs["schema_version"] = 1
    return tmp_path / "nan.h5"


def test_bad_input(demo_store, tmp_path, cli):
    (tmp_path / "nopath.csv").write_text("File\nx.png\n")
    (tmp_path / "v2.h5").write_bytes(b"")
    with h5py.File(tmp_path / "v2.h5", "w") as handle:
        handle.attrs["schema_version"] = 2
    out = ["--out", str(tmp_path / "s.csv")]
    cases = [
        ([demo_store, "--k", "0", *out], "--k 0: choose at least 1"),
        ([demo_store, "--k", "5", *out, "--selector", "oracle-balanced"], "for `xsel evaluate` only"),
        ([demo_store, "--k", "5", *out, "--selector", "best"], "unknown selector 'best'; choose one of:"),
        ([demo_store, "--k", "5", *out, "--exclude", tmp_path / "nopath.csv"], "no 'Path' column"),
        ([_nan_store(tmp_path), "--k", "2", *out], "1 embeddings hold NaN or infinite values: row 2 (c)"),
        ([tmp_path / "missing.h5", "--k", "2", *out], "embedding store not found"),
        ([tmp_path / "v2.h5", "--k", "2", *out], "schema_version 2 is not 1"),
        ([demo_store, "--k", "2", *out, "--store", tmp_path / "x.h5"], "applies to site mode only"),
        ([demo_store, "--k", "2", *out, "--bundle", tmp_path, "--checkpoint", tmp_path / "c.pt"], "exclude each other"),
    ]
    for args, message in cases:
        result = cli("select", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert not (tmp_path / "s.csv").exists()


def test_library_refuses_k_zero(demo_store):
    with pytest.raises(InputError):
        select(demo_store, 0)


def test_a_pool_of_part_of_the_store_picks_alike_from_the_file_and_from_a_loaded_store(demo_store, tmp_path):
    """select() given the file moves the pool to the front of its own copy (no second copy beside the store); given a
    loaded Store it must not touch it. Both pick the same images, with the same scores and reasons."""
    store = read_store(demo_store)
    before = store.embeddings.copy()
    exclude = tmp_path / "labelled.csv"
    pd.DataFrame({"Path": store.paths[::7]}).to_csv(exclude, index=False)
    for selector in ("kcenter", "typiclust", "random"):
        from_file = select(demo_store, 8, selector=selector, exclude=exclude, seed=2)
        from_store = select(store, 8, selector=selector, exclude=exclude, seed=2)
        assert from_file.pool_size < len(store)
        assert {**from_file.record, "inputs": None} == {**from_store.record, "inputs": None}
        pd.testing.assert_frame_equal(from_file.table, from_store.table)
        pool = from_file.store.paths
        assert [pool[i] for i in from_file.pool] == [store.paths[i] for i in from_store.pool]
    assert np.array_equal(store.embeddings, before), "a caller's store is never modified"
