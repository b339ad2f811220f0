"""Small DICOM files written with pydicom, and a hospital-like folder of them for scan/export/report tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

ENTROPY = 12345  # fixed UID entropy: the same folder gives the same UIDs in every run


def uid(name: str) -> str:
    return generate_uid(entropy_srcs=[str(ENTROPY), name])


def write_dicom(
    path: Path,
    *,
    name: str,
    pixels: np.ndarray | None = None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags,
) -> Path:
    """One DICOM file; ``tags`` are keyword → value (e.g. ``PatientID="p1"``); ``pixels`` None: no pixel data."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.file_meta.MediaStorageSOPInstanceUID = uid(name)
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.SOPInstanceUID = uid(name)
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    if pixels is not None:
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = photometric
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.PixelRepresentation = 0
        if transfer_syntax == JPEGLSLossless:
            dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64) + b"\xff\xd9"])
        else:
            dataset.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def gradient(seed: int, size: int = 48) -> np.ndarray:
    """A 12-bit image: a left-to-right ramp plus a seeded blob, so images differ and orientation shows."""
    rng = np.random.default_rng(seed)
    ramp = np.tile(np.linspace(0, 3000, size), (size, 1))
    y, x = np.mgrid[:size, :size]
    cy, cx = rng.integers(8, size - 8, 2)
    blob = 1000 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 40.0)
    return np.clip(ramp + blob, 0, 4095).astype(np.uint16)


CHEST = {"Modality": "DX", "BodyPartExamined": "CHEST"}


def write_site_folder(folder: Path) -> dict[str, str]:
    """A PACS-export-like folder; returns relative path → what it is (for the tests' expectations).

    Readable chest images of 4 patients and 5 studies (PA, AP, lateral; M/F/O; ages in Y/M/D), one
    MONOCHROME1, one without ViewPosition (view in SeriesDescription), one without a suffix (DICM magic
    only), one with no sex or age; a hand radiograph and a CT (not chest); a PNG and a JPEG; and unreadable
    files: no pixel data, truncated, JPEG-LS (needs a decoder plugin), not DICOM.
    """
    kinds = {}

    def add(relative: str, kind: str, **kwargs) -> None:
        write_dicom(folder / relative, name=relative, **kwargs)
        kinds[relative] = kind

    study1, study2, study3 = uid("study1"), uid("study2"), uid("study3")
    add(
        "p1/s1/pa.dcm",
        "chest-pa",
        pixels=gradient(1),
        PatientID="p1",
        PatientSex="M",
        PatientAge="065Y",
        ViewPosition="PA",
        StudyInstanceUID=study1,
        SeriesInstanceUID=uid("series1"),
        StudyDate="20240105",
        SpecificCharacterSet="ISO_IR 100",
        InstitutionName="Hôpital Nord",
        Manufacturer="ACME Medical",
        **CHEST,
    )
    add(
        "p1/s1/lat.dcm",
        "chest-lateral",
        pixels=gradient(2),
        PatientID="p1",
        PatientSex="M",
        PatientAge="065Y",
        ViewPosition="LL",
        StudyInstanceUID=study1,
        SeriesInstanceUID=uid("series2"),
        StudyDate="20240105",
        **CHEST,
    )
    add(
        "p1/s2/pa.dcm",
        "chest-pa",
        pixels=gradient(3),
        PatientID="p1",
        PatientSex="M",
        PatientAge="066Y",
        ViewPosition="PA",
        StudyInstanceUID=study2,
        SeriesInstanceUID=uid("series3"),
        StudyDate="20250210",
        **CHEST,
    )
    add(
        "p2/ap_mono1.dcm",
        "chest-ap-monochrome1",
        pixels=gradient(4),
        photometric="MONOCHROME1",
        PatientID="p2",
        PatientSex="F",
        PatientAge="006M",
        SeriesDescription="CHEST AP PORTABLE",
        Modality="CR",
        InstitutionName="Children's Hospital",
        StudyInstanceUID=study3,
    )
    add(
        "p3/IM0001",
        "chest-pa-no-suffix",
        pixels=gradient(5),
        PatientID="p3",
        PatientSex="O",
        PatientAge="010D",
        ViewPosition="PA",
        StudyInstanceUID=uid("study4"),
        **CHEST,
    )
    add(
        "p4/anonymous.dcm",
        "chest-no-sex-age",
        pixels=gradient(6),
        PatientID="p4",
        ViewPosition="AP",
        StudyInstanceUID=uid("study5"),
        **CHEST,
    )
    add(
        "p4/hand.dcm",
        "hand",
        pixels=gradient(7),
        PatientID="p4",
        Modality="DX",
        BodyPartExamined="HAND",
        ViewPosition="PA",
    )
    add("p4/ct.dcm", "ct", pixels=gradient(8), PatientID="p4", Modality="CT", BodyPartExamined="CHEST")
    add("bad/report.dcm", "error:no pixel data", PatientID="p5", Modality="SR")
    add(
        "bad/jpegls.dcm",
        "error:decoder",
        pixels=gradient(9),
        transfer_syntax=JPEGLSLossless,
        PatientID="p5",
        ViewPosition="PA",
        **CHEST,
    )
    add("bad/truncated.dcm", "error:truncated", pixels=gradient(10), PatientID="p5", ViewPosition="PA", **CHEST)
    truncated = folder / "bad/truncated.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    (folder / "bad/not_dicom.dcm").write_text("this is not a DICOM file\n")
    kinds["bad/not_dicom.dcm"] = "error:not dicom"
    (folder / "png").mkdir()
    Image.fromarray((gradient(11) // 16).astype(np.uint8)).save(folder / "png/one.png")
    kinds["png/one.png"] = "png"
    Image.fromarray((gradient(12) // 16).astype(np.uint8)).convert("RGB").save(folder / "png/two.jpg", quality=95)
    kinds["png/two.jpg"] = "jpeg"
    (folder / "README.txt").write_text("exported from the PACS\n")
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    return kinds
