"""``xsel scan``: a hospital-like folder of DICOM/PNG/JPEG files → the standard image table."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

import xsel.scan as scan_module
from tests.dicom_folder import gradient, write_dicom, write_site_folder
from xsel.errors import InputError
from xsel.io.table import file_sha256, read_image_table
from xsel.scan import SCAN_COLUMNS, normalise_view, parse_age, scan_errors_path, scan_folder


@pytest.fixture
def site(tmp_path):
    folder = tmp_path / "pacs"
    return folder, write_site_folder(folder)


def test_tags_land_in_the_standard_columns(site):
    folder, kinds = site
    result = scan_folder(folder, show_progress=False)
    table = result.table.set_index("Path")
    assert list(result.table.columns) == list(SCAN_COLUMNS)
    readable = sorted(p for p, kind in kinds.items() if not kind.startswith("error"))
    assert result.table["Path"].tolist() == readable  # sorted, README and hidden files ignored
    pa = table.loc["p1/s1/pa.dcm"]
    header = pydicom.dcmread(folder / "p1/s1/pa.dcm", stop_before_pixels=True)
    assert (pa.PatientID, pa.Sex, pa.Age, pa.View, pa.Modality, pa.BodyPart) == ("p1", "M", 65, "PA", "DX", "CHEST")
    assert (pa.StudyInstanceUID, pa.SeriesInstanceUID) == (header.StudyInstanceUID, header.SeriesInstanceUID)
    assert pa.SOPInstanceUID == header.SOPInstanceUID and pa.StudyDate == "2024-01-05"
    assert (pa.Institution, pa.Manufacturer) == ("Hôpital Nord", "ACME Medical")  # Latin-1 in the file
    assert table.loc["p1/s1/lat.dcm", "View"] == "L"
    child = table.loc["p2/ap_mono1.dcm"]  # view from SeriesDescription, age in months
    assert (child.View, child.Sex, child.Age, child.Modality) == ("AP", "F", 0.5, "CR")
    assert child.Institution == "Children's Hospital" and pd.isna(child.Manufacturer)
    assert pd.isna(child.BodyPart) and pd.isna(child.StudyDate) and pd.isna(child.SeriesInstanceUID)
    assert (table.loc["p3/IM0001", "Sex"], table.loc["p3/IM0001", "Age"]) == ("O", 0.03)  # DICM magic, no suffix
    assert table.loc["p4/anonymous.dcm", ["Sex", "Age"]].isna().all()  # missing tags stay blank
    assert table.loc[["png/one.png", "png/two.jpg"]].drop(columns=[]).isna().all().all()


def test_unreadable_files_are_listed_with_the_reason(site):
    folder, _ = site
    errors = scan_folder(folder, show_progress=False).errors.set_index("Path")["error"]
    assert sorted(errors.index) == ["bad/jpegls.dcm", "bad/not_dicom.dcm", "bad/report.dcm", "bad/truncated.dcm"]
    assert "no pixel data" in errors["bad/report.dcm"]
    assert "truncated" in errors["bad/truncated.dcm"]
    assert "not a DICOM file" in errors["bad/not_dicom.dcm"]
    decoder = errors["bad/jpegls.dcm"]
    assert "JPEG-LS" in decoder and "pylibjpeg" in decoder and "python-gdcm" in decoder


def test_filters_count_what_they_leave_out(site):
    folder, _ = site
    result = scan_folder(folder, chest_only=True, frontal_only=True, show_progress=False)
    assert result.table["Path"].tolist() == [
        "p1/s1/pa.dcm",
        "p1/s2/pa.dcm",
        "p2/ap_mono1.dcm",
        "p3/IM0001",
        "p4/anonymous.dcm",
    ]
    counts = result.left_out_counts
    assert counts == {
        "not DICOM: no Modality/BodyPartExamined to tell (--chest-only)": 2,
        "modality CT is not a radiograph (--chest-only)": 1,
        "body part HAND (--chest-only)": 1,
        "view L is not frontal (--frontal-only)": 1,
    }
    assert sum(counts.values()) == len(result.left_out) == 5
    frontal = scan_folder(folder, frontal_only=True, show_progress=False)
    assert "p4/hand.dcm" in frontal.table["Path"].tolist()  # frontal but not chest: only --chest-only drops it


def test_process_pool_gives_the_same_table(site, monkeypatch):
    folder, _ = site
    alone = scan_folder(folder, workers=1, show_progress=False)
    monkeypatch.setattr(scan_module, "POOL_THRESHOLD", 1)
    pooled = scan_folder(folder, workers=2, show_progress=False)
    pd.testing.assert_frame_equal(alone.table, pooled.table)
    pd.testing.assert_frame_equal(alone.errors, pooled.errors)


def test_cli_writes_the_table_and_its_errors(site, tmp_path, cli):
    folder, _ = site
    out = tmp_path / "out" / "images.csv"
    result = cli("scan", folder, "--out", out, "--chest-only", "-q")
    assert result.exit_code == 0, result.output
    assert "4 left out" in result.stdout and "4 unreadable" in result.stdout
    assert "modality CT is not a radiograph" in result.stdout  # the table of reasons
    assert pd.read_csv(out)["Path"].tolist()[0] == "p1/s1/lat.dcm"
    assert len(pd.read_csv(scan_errors_path(out))) == 4
    for bad in ("report", "jpegls", "truncated", "not_dicom"):
        (folder / "bad" / f"{bad}.dcm").unlink()
    assert cli("scan", folder, "--out", out, "-q").exit_code == 0
    assert not scan_errors_path(out).exists()  # a stale list would mislead


def test_a_rescan_replaces_a_scan_written_before_institution_and_manufacturer(site, tmp_path, cli):
    folder, _ = site
    out = tmp_path / "images.csv"
    old = scan_folder(folder, show_progress=False).table.drop(columns=["Institution", "Manufacturer"])
    old.to_csv(out, index=False)
    assert cli("scan", folder, "--out", out, "-q").exit_code == 0
    assert list(pd.read_csv(out).columns) == list(SCAN_COLUMNS)
    out.write_text("Path,label\na.png,1\n")  # not a scan: never overwritten
    result = cli("scan", folder, "--out", out, "-q")
    assert result.exit_code == 2 and out.read_text() == "Path,label\na.png,1\n"


def test_a_folder_reads_as_its_scanned_csv(site, tmp_path, cli):
    folder, _ = site
    csv = tmp_path / "images.csv"
    assert cli("scan", folder, "--out", csv, "-q").exit_code == 0
    from_folder = read_image_table(folder, show_progress=False)
    from_csv = read_image_table(csv, image_root=folder)
    pd.testing.assert_frame_equal(from_folder.frame, from_csv.frame)
    assert from_folder.files == from_csv.files == [folder / p for p in from_csv.paths]
    assert from_folder.source_sha256 == from_csv.source_sha256 == file_sha256(csv)
    assert from_folder.frame["PatientID"].dropna().map(type).eq(str).all()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: (f / "notes.txt").write_text("no images here"), "no PNG, JPEG or DICOM files found"),
        (lambda f: (f / "x.dcm").write_text("not dicom"), "none of the 1 image files could be read"),
    ],
)
def test_folders_without_usable_images_are_input_errors(tmp_path, cli, make, message):
    folder = tmp_path / "empty"
    folder.mkdir()
    make(folder)
    result = cli("scan", folder, "--out", tmp_path / "images.csv", "-q")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    with pytest.raises(InputError, match=message):
        read_image_table(folder, show_progress=False)


def test_a_missing_folder_is_an_input_error(tmp_path, cli):
    result = cli("scan", tmp_path / "missing", "--out", tmp_path / "images.csv")
    assert result.exit_code == 2 and "folder not found" in result.output


def test_deflated_files_are_read(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_dicom(
        tmp_path / "d.dcm",
        name="d",
        pixels=gradient(1),
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        PatientID="p9",
        ViewPosition="AP",
    )
    result = scan_folder(tmp_path, show_progress=False)
    assert result.errors.empty and result.table.loc[0, "PatientID"] == "p9"


def test_every_image_left_out_is_an_input_error(site):
    folder, _ = site
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix not in (".png", ".jpg"):
            path.unlink()
    with pytest.raises(InputError, match="every image was left out by the filters"):
        scan_folder(folder, chest_only=True, show_progress=False)


@pytest.mark.parametrize(
    ("text", "years"),
    [("065Y", 65), ("006M", 0.5), ("010D", 0.03), ("003W", 0.06), ("62", 62), ("", None), ("abc", None)],
)
def test_dicom_ages_in_years(text, years):
    assert parse_age(text) == years


@pytest.mark.parametrize(
    ("position", "descriptions", "view"),
    [
        ("PA", [], "PA"),
        ("LL", [], "L"),
        ("LATERAL", [], "L"),
        ("RLD", [], "RLD"),
        ("", ["CHEST P.A."], "PA"),
        ("", ["Thorax ap portable"], "AP"),
        ("", ["CHEST LAT"], "L"),
        ("", ["CHEST PA AND LAT"], ""),
        ("", ["PAIN", "CAPTURE"], ""),
    ],
)
def test_views_from_view_position_or_descriptions(position, descriptions, view):
    assert normalise_view(position, descriptions) == view


@pytest.mark.realdata
def test_real_dicom_originals(realcxr):
    result = scan_folder(realcxr / "originals", chest_only=True, show_progress=False)
    assert result.table["Path"].tolist() == ["dicom_cxr_fake_monochrome1.dcm", "dicom_cxr_monochrome2.dcm"]
    row = result.table.iloc[0]
    assert (row.Modality, row.BodyPart, row.View, row.Sex, row.Age) == ("CR", "CHEST", "PA", "M", 62)
    assert result.errors.empty and result.left_out_counts == {
        "not DICOM: no Modality/BodyPartExamined to tell (--chest-only)": 17
    }


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_every_encoding_and_nested_sequences_are_read(tmp_path, transfer_syntax):
    """Sequences before the tags are stepped over, non-ASCII names decoded with SpecificCharacterSet."""
    inner = Dataset()
    inner.CodeValue, inner.PatientID = "X", "not-the-patient"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ConceptNameCodeSequence = Sequence([inner])
    write_dicom(
        tmp_path / "x.dcm", name="x", pixels=gradient(1), transfer_syntax=transfer_syntax, PatientID="Müller",
        SpecificCharacterSet="ISO_IR 100", ViewPosition="PA", ReferencedStudySequence=Sequence([item, Dataset()]),
        PatientAge="045Y",
    )  # fmt: skip
    row = scan_folder(tmp_path, show_progress=False).table.iloc[0]
    assert (row.PatientID, row.View, row.Age) == ("Müller", "PA", 45)


def test_an_unreadable_subfolder_is_listed_not_fatal(tmp_path, monkeypatch):
    folder = tmp_path / "pacs"
    write_site_folder(folder)
    real_scandir = os.scandir

    def locked(path):
        if Path(path).name == "p2":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(scan_module.os, "scandir", locked)
    result = scan_folder(folder, show_progress=False)
    assert "p2/" in result.errors["Path"].tolist() and len(result.table) > 0
    assert not result.table["Path"].str.startswith("p2/").any()
