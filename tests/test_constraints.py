"""Selection constraints: one image per patient or study, near-duplicate removal, balance and quotas — applied by
the framework around every selector, with reasons per pick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xsel.constraints import Constraints, duplicate_groups, one_per_unit, parse_quotas, plan_strata
from xsel.errors import InputError
from xsel.selection import select
from xsel.store import Store

BASELINES = ["random", "kcenter", "kmedoids", "typiclust", "probcover"]


def site_store(n: int = 120, seed: int = 0) -> Store:
    """Patients with two studies each, views PA/AP/LAT, both sexes, ages 5–90, and a few exact copies."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    embeddings[10] = embeddings[3]  # an exact copy (identical pixels → identical embeddings)
    embeddings[11] = embeddings[3] * 1.0001  # and a near-exact one
    meta = pd.DataFrame(
        {
            "PatientID": [f"P{i // 4:03d}" for i in range(n)],
            "StudyInstanceUID": [f"1.2.{i // 2}" for i in range(n)],
            "View": rng.choice(["PA", "PA", "PA", "AP", "LAT"], size=n),
            "Sex": rng.choice(["M", "F"], size=n),
            "Age": rng.integers(5, 90, size=n).astype(float),
        }
    )
    return Store(path=Path("site.h5"), embeddings=embeddings, paths=[f"img{i}.dcm" for i in range(n)], meta=meta)


def test_one_image_per_study_or_per_patient():
    store = site_store()
    per_study = select(store, 200, selector="random", constraints=Constraints(one_per="study"))
    per_patient = select(store, 200, selector="random")
    assert per_study.table["StudyInstanceUID"].is_unique and len(per_study.table) == 60
    assert per_patient.table["PatientID"].is_unique and len(per_patient.table) == 30
    assert per_study.record["removed_by_one_per"] == 60


def test_dedup_groups_copies_and_keeps_the_first():
    store = site_store()
    groups = duplicate_groups(store.embeddings, 0.999)
    assert [group.tolist() for group in groups] == [[3, 10, 11]]
    chosen = select(store, 200, selector="random", constraints=Constraints(one_per="image", dedup=0.999))
    assert {"img10.dcm", "img11.dcm"}.isdisjoint(chosen.table["Path"]) and "img3.dcm" in set(chosen.table["Path"])
    assert chosen.record["duplicate_groups"] == [["img3.dcm", "img10.dcm", "img11.dcm"]]
    assert chosen.record["removed_by_dedup"] == 2 and any("near-duplicates" in w for w in chosen.warnings)


@pytest.mark.parametrize("name", BASELINES)
def test_every_selector_meets_balance_exactly(name):
    store = site_store()
    chosen = select(store, 12, selector=name, constraints=Constraints(one_per="image", balance=("Sex",)))
    assert chosen.table["Sex"].value_counts().to_dict() == {"M": 6, "F": 6}
    assert chosen.table["Path"].is_unique and len(chosen.table) == 12
    assert all("[stratum " in reason for reason in chosen.table["reason"])
    again = select(store, 12, selector=name, constraints=Constraints(one_per="image", balance=("Sex",)))
    assert chosen.table["Path"].tolist() == again.table["Path"].tolist(), "same seed, same selection"


def test_quota_is_met_exactly_and_the_rest_shares_what_remains():
    store = site_store()
    constraints = Constraints(one_per="image", quotas=parse_quotas("View=PA:0.7"))
    chosen = select(store, 20, selector="typiclust", constraints=constraints)
    counts = chosen.table["View"].value_counts()
    assert counts["PA"] == 14 and counts.drop("PA").sum() == 6
    prefix = chosen.table["View"].iloc[:10]
    assert (prefix == "PA").sum() == 7, "the order interleaves strata: every prefix is as balanced as possible"


def test_a_quota_the_pool_cannot_meet_takes_what_there_is_and_says_so():
    store = site_store()
    store.meta.loc[:, "View"] = ["LAT" if i < 3 else "PA" for i in range(len(store))]
    chosen = select(
        store, 20, selector="random", constraints=Constraints(one_per="image", quotas=parse_quotas("View=LAT:0.5"))
    )
    assert (chosen.table["View"] == "LAT").sum() == 3 and len(chosen.table) == 20
    assert chosen.record["shortfalls"] and any("quotas not met" in w for w in chosen.warnings)


def test_age_bands_are_derived_from_age():
    store = site_store()
    chosen = select(store, 10, selector="random", constraints=Constraints(one_per="image", balance=("AgeBand",)))
    plan = plan_strata(store.meta, 10, Constraints(balance=("AgeBand",)))
    assert {key[0] for key in plan.keys} == {"0-17", "18-39", "40-59", "60-79", "80+"}
    assert len(chosen.table) == 10 and chosen.table["Age"].notna().all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Constraints(quotas=parse_quotas("View=PA:0.7,View=AP:0.5")), "add up to more than 1"),
        (lambda: Constraints(quotas=parse_quotas("View=PA:0.5,Sex=F:0.5")), "one column at a time"),
        (lambda: Constraints(balance=("View",), quotas=parse_quotas("View=PA:0.5")), "both set View"),
        (lambda: Constraints(quotas=parse_quotas("View=PA:0.5,View=PA:0.2")), "same value twice"),
        (lambda: parse_quotas("View:PA=0.5"), "write COLUMN=VALUE:SHARE"),
        (lambda: Constraints(one_per="series"), "--one-per series"),
        (lambda: Constraints(dedup=1.5), "--dedup 1.5"),
    ],
)
def test_contradictory_or_malformed_constraints_are_input_errors(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_reasons_say_why_each_image_was_picked():
    store = site_store()
    typical = select(store, 5, selector="typiclust")
    assert typical.table["reason"].str.match(r"most typical image of cluster \d+ of 5 \(\d+ images\)").all()
    farthest = select(store, 5, selector="kcenter")
    assert farthest.table["reason"].iloc[0] == "nearest the centre of the pool"
    assert farthest.table["reason"].iloc[1:].str.startswith("farthest from the picks so far").all()


def test_cli_writes_a_certificate_that_verifies_and_names_what_changed(demo_store, tmp_path, cli):
    import json
    import shutil

    store = tmp_path / "pool.h5"
    shutil.copy(demo_store, store)
    out = tmp_path / "picks.csv"
    result = cli("select", store, "--k", "8", "--out", out, "--balance", "Sex", "--dedup", "0.999", "--seed", "3")
    assert result.exit_code == 0, result.output
    certificate = tmp_path / "picks.SELECTION.json"
    record = json.loads(certificate.read_text())
    assert record["k"] == 8 and record["seed"] == 3 and record["constraints"]["balance"] == ["Sex"]
    assert record["encoder"]["encoder"] == "pixels" and record["inputs"]["store"]["sha256"]
    assert [p["rank"] for p in record["picks"]] == list(range(1, 9)) and all(p["reason"] for p in record["picks"])
    assert record["pool"]["removed_by_one_per"] > 0 and {s["picked"] for s in record["strata"]} == {4}

    verified = cli("select", "--verify", certificate)
    assert verified.exit_code == 0 and "all 8 picks were reproduced" in verified.stdout, verified.output

    edited = pd.read_csv(out)
    edited.loc[0, "Path"] = "someone/else.png"
    edited.to_csv(out, index=False)
    tampered = cli("select", "--verify", certificate)
    assert tampered.exit_code == 1 and f"selection {out} changed" in tampered.stderr, tampered.output

    record["picks"][2]["path"] = "not/picked.png"
    record["selection"] = None
    certificate.write_text(json.dumps(record))
    differs = cli("select", "--verify", certificate)
    assert differs.exit_code == 1 and "rank 3: recomputed" in differs.stderr, differs.output

    store.unlink()
    gone = cli("select", "--verify", certificate)
    assert gone.exit_code == 1 and f"store {store} is missing" in gone.stderr


def test_cli_constraint_errors_are_one_line_exit_2(demo_store, tmp_path, cli):
    contradictory = cli(
        "select", demo_store, "--k", "5", "--out", tmp_path / "s.csv", "--quota", "View=PA:0.8,View=AP:0.5"
    )
    assert contradictory.exit_code == 2 and "add up to more than 1" in contradictory.stderr
    both = cli(
        "select", demo_store, "--k", "5", "--out", tmp_path / "s.csv", "--allow-same-patient", "--one-per", "study"
    )
    assert both.exit_code == 2 and "contradict" in both.stderr
    assert not (tmp_path / "s.csv").exists()


def test_a_quota_value_missing_from_the_pool_is_reported_and_matched_regardless_of_case():
    store = site_store()
    missing = select(
        store, 10, selector="random", constraints=Constraints(one_per="image", quotas=parse_quotas("View=LL:0.5"))
    )
    assert any("View=LL:0.5: no image in the pool for a share of 5.0" in w for w in missing.warnings)
    lower = select(
        store, 10, selector="random", constraints=Constraints(one_per="image", quotas=parse_quotas("View=pa:0.7"))
    )
    assert (lower.table["View"] == "PA").sum() == 7 and not any("not met" in w for w in lower.warnings)


def test_malformed_quota_shares_are_input_errors():
    for text in ("View=PA:1.2.3", "View=PA:.", "View=PA:-0.1"):
        with pytest.raises(InputError, match="COLUMN=VALUE:SHARE|between 0 and 1"):
            parse_quotas(text)


def test_strata_draw_with_their_own_seeds():
    """Two equal strata must not pick the same positions (View alternates PA/AP row by row here)."""
    store = site_store()
    store.meta.loc[:, "View"] = ["PA" if i % 2 else "AP" for i in range(len(store))]
    chosen = select(store, 20, selector="random", constraints=Constraints(one_per="image", balance=("View",)))
    rows = sorted(int(path[3:-4]) for path in chosen.table["Path"])
    pa, ap = {r // 2 for r in rows if r % 2}, {r // 2 for r in rows if not r % 2}
    assert pa != ap, "the strata drew the same positions"


def test_blank_values_form_their_own_stratum_last_and_are_noted():
    store = site_store()
    store.meta.loc[:5, "Sex"] = None
    chosen = select(store, 3, selector="random", constraints=Constraints(one_per="image", balance=("Sex",)))
    assert chosen.table["Sex"].notna().sum() >= 2, "ties go to known values before blank ones"
    assert any("6 images have no Sex" in w for w in chosen.warnings)


def test_dedup_also_removes_copies_of_images_labelled_before(tmp_path):
    store = site_store()
    labelled = tmp_path / "round1.csv"
    pd.DataFrame({"Path": ["img3.dcm"]}).to_csv(labelled, index=False)
    chosen = select(
        store, 200, selector="random", exclude=labelled, constraints=Constraints(one_per="image", dedup=0.999)
    )
    assert {"img3.dcm", "img10.dcm", "img11.dcm"}.isdisjoint(chosen.table["Path"])
    assert chosen.record["duplicate_groups"] == [["img3.dcm", "img10.dcm", "img11.dcm"]]


def test_a_selection_from_a_store_in_memory_cannot_be_verified_and_says_so(tmp_path):
    from xsel.certificate import verify, write_certificate

    chosen = select(site_store(), 5, selector="random")
    out = tmp_path / "s.csv"
    chosen.table.to_csv(out, index=False)
    with pytest.raises(InputError, match="held in memory"):
        verify(write_certificate(chosen, out))


def test_one_per_patient_keeps_the_first_of_each_id_and_every_blank_one():
    """The first of the given rows per patient ID, in the order given; IDs compare as text (7 and "7" are one
    patient); None, NaN, pd.NA and blank text never group images."""
    ids = ["A", None, "A", " ", np.nan, "B", 7, "7", pd.NA, "", "B"]
    meta = pd.DataFrame({"PatientID": pd.Series(ids, dtype=object)})
    rows = np.array([10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9])
    kept = one_per_unit(meta, rows, "patient")
    assert kept.tolist() == [10, 2, 1, 3, 4, 6, 8, 9] and kept.dtype == np.int64
    assert one_per_unit(meta, rows[:0], "patient").tolist() == []
    assert one_per_unit(meta, rows, "image") is rows
