"""Benchmark: `xsel scan` files/s on a folder of small DICOM files (tags only, pixels never decoded).

Writes ``--files`` DICOM files (64×64 16-bit pixels and a header of about 45 elements, like a CR/DX export,
spread over 100 patient folders) into a temporary folder, then times :func:`xsel.scan.scan_folder` with one
process and with one process per core, ``--repeats`` times each, alternating. The files were just written,
so they are in the page cache: this measures header parsing, not the disk.

    python bench/bench_scan.py [--files 20000] [--repeats 3]      # the issue's figure is for 100,000 files
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from xsel.scan import scan_folder


def write_files(folder: Path, count: int) -> float:
    """``count`` small DICOM files; returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    for index in range(count):
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.SpecificCharacterSet = "ISO_IR 100"
        dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = "20240105"
        dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = "101500"
        dataset.AccessionNumber = f"A{index:08d}"
        dataset.Modality = "DX"
        dataset.Manufacturer = "Vendor"
        dataset.InstitutionName = "Hospital"
        dataset.ReferringPhysicianName = "Doe^John"
        dataset.StudyDescription = "CHEST 2 VIEWS"
        dataset.SeriesDescription = "CHEST PA" if index % 4 else "CHEST LAT"
        dataset.PatientName = f"Patient^{index // 3}"
        dataset.PatientID = f"P{index // 3:07d}"
        dataset.PatientBirthDate = "19600101"
        dataset.PatientSex = "MF"[index % 2]
        dataset.PatientAge = f"{40 + index % 50:03d}Y"
        dataset.BodyPartExamined = "CHEST"
        dataset.ViewPosition = "PA" if index % 4 else "LL"
        dataset.KVP = "120"
        dataset.ExposureTime = "10"
        dataset.XRayTubeCurrent = "200"
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.StudyID = "1"
        dataset.SeriesNumber = dataset.InstanceNumber = "1"
        dataset.PatientOrientation = ["L", "F"]
        dataset.Rows = dataset.Columns = 64
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
        dataset.PixelSpacing = ["0.139", "0.139"]
        dataset.WindowCenter, dataset.WindowWidth = "2048", "4096"
        dataset.RescaleIntercept, dataset.RescaleSlope = "0", "1"
        dataset.PixelData = pixels
        path = folder / f"patient{index % 100:03d}" / f"{index:07d}.dcm"
        path.parent.mkdir(exist_ok=True)
        dataset.save_as(path, enforce_file_format=True)
    return time.perf_counter() - started


def measure(files: int, repeats: int) -> dict[int, list[float]]:
    """files/s of `scan_folder` with one process and with one per core, ``repeats`` times each, alternating."""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="xsel-scan-bench-") as temporary:
        folder = Path(temporary)
        seconds = write_files(folder, files)
        print(f"wrote {files:,} DICOM files in {seconds:.1f} s ({files / seconds:,.0f} files/s)")
        rates: dict[int, list[float]] = {1: [], cores: []}
        for _ in range(repeats):
            for workers in rates:
                result = scan_folder(folder, workers=workers, show_progress=False)
                assert len(result.table) == files and result.errors.empty
                rates[workers].append(result.files_per_second)
    return rates


def summary_lines(rates: dict[int, list[float]]) -> list[str]:
    return [
        f"xsel scan, {workers} process{'es' if workers > 1 else ''}: {statistics.median(values):,.0f} files/s "
        f"(median of {len(values)}; min {min(values):,.0f}, max {max(values):,.0f})"
        for workers, values in rates.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("\n".join(summary_lines(measure(args.files, args.repeats))))


if __name__ == "__main__":
    main()
