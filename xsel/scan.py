"""Scan a folder of PNG, JPEG and DICOM files into an image table with the standard columns.

A hospital site has a folder (a PACS export), not a CSV. :func:`scan_folder` walks it recursively in sorted
order, reads each DICOM file's tags without decoding its pixels, and writes them into the columns every
command reads (``Path``, ``PatientID``, ``Sex``, ``Age``, ``View``, …). Tags that are missing stay blank.

Normalised values: ``Sex`` is M, F or O (PatientSex); ``Age`` is years from the DICOM age string
(``065Y`` → 65, ``006M`` → 0.5, ``010D`` → 0.03, ``003W`` → 0.06; a bare number is read as years);
``View`` is PA, AP or L (ViewPosition LL, RL, LAT, LATERAL), other ViewPosition values verbatim, and when
ViewPosition is blank the one view that SeriesDescription or ProtocolName names (none if they name two);
``StudyDate`` is YYYY-MM-DD. ``Institution`` (InstitutionName) and ``Manufacturer`` are verbatim: in an archive
merged from several hospitals or scanners they name the groups that ``--balance`` and ``--episodes-within`` read.

Which files count: PNG and JPEG by suffix, DICOM by suffix (.dcm, .dicom, .dic) or by the ``DICM`` magic at
byte 128 (PACS exports often have no suffix); hidden files and folders are skipped. A file is unreadable, listed
with the reason and skipped, when its header cannot be parsed, it has no pixel data, its pixel data is
truncated, or its transfer syntax needs a decoder that is not installed (the message names the package).
PNG/JPEG files are checked by their header only; a file that fails to decode later is listed by ``embed``.
Headers are read by ``pydicom.dcmread(stop_before_pixels=True, specific_tags=…)``; large folders by a process
pool.

Filters (each left-out file is counted under its reason):
  chest_only    Modality is a projection radiograph (CR, DX, DR, RG) and the body part is the chest:
                BodyPartExamined names CHEST, THORAX or LUNG, or is blank while SeriesDescription,
                ProtocolName or StudyDescription does. PNG/JPEG files have no tags to tell and are left out.
  frontal_only  View (as normalised above) is PA or AP; unknown views are left out.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.datadict import keyword_dict
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from xsel.errors import InputError
from xsel.io.atomic import write_atomic
from xsel.io.images import DICOM_SUFFIXES
from xsel.io.table import PATH_COLUMN, write_errors_csv
from xsel.io.workers import die_with_parent, worker_pool
from xsel.progress import progress_bar

SCAN_COLUMNS = (
    PATH_COLUMN,
    "PatientID",
    "Sex",
    "Age",
    "View",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPart",
    "StudyDate",
    "Institution",
    "Manufacturer",
)
# The columns of scans written before Institution and Manufacturer: a rescan may replace such a CSV too.
SCAN_HEADER = SCAN_COLUMNS[: SCAN_COLUMNS.index("StudyDate") + 1]
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG"}
CHEST_WORDS = re.compile(r"CHEST|THORAX|LUNG")
FRONTAL_VIEWS = {"PA", "AP"}
LATERAL_VIEWS = {"L", "LL", "RL", "LAT", "LATERAL"}
DESCRIPTION_VIEWS = {
    "PA": re.compile(r"(?<![A-Z])P\.?A\.?(?![A-Z])"),
    "AP": re.compile(r"(?<![A-Z])A\.?P\.?(?![A-Z])"),
    "L": re.compile(r"(?<![A-Z])(LAT|LATERAL|LL|RL)(?![A-Z])"),
}
AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}  # PixelData, DoubleFloatPixelData, FloatPixelData
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
TAGS = [
    "SpecificCharacterSet",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    "StudyDate",
    "InstitutionName",
    "Manufacturer",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "NumberOfFrames",
]
TAG_NUMBERS = {keyword: keyword_dict[keyword] for keyword in TAGS}
WANTED_TAGS = set(TAG_NUMBERS.values())
SHORT_TAGS = {"Rows", "Columns", "SamplesPerPixel", "BitsAllocated"}  # US: 2-byte binary, the rest is text
UNDEFINED = 0xFFFFFFFF
# Pool start-up costs ~0.1 s; below this many files one process is faster.
POOL_THRESHOLD = 2000
POOL_CHUNK = 256
PROGRESS_EVERY = 64
# pydicom's plugin dependency names → the pip package that provides them.
PIP_NAMES = {"gdcm": "python-gdcm"}


@dataclass
class ScanResult:
    """The scanned table (``SCAN_COLUMNS``), the unreadable files, and what the filters left out and why."""

    folder: Path
    table: pd.DataFrame
    errors: pd.DataFrame
    left_out: pd.DataFrame
    files_seen: int
    seconds: float

    @property
    def left_out_counts(self) -> dict[str, int]:
        """Reason → number of files left out by ``chest_only`` / ``frontal_only``."""
        return dict(Counter(self.left_out["reason"]).most_common())

    @property
    def files_per_second(self) -> float:
        return self.files_seen / self.seconds if self.seconds > 0 else float("inf")


def scan_errors_path(out: str | Path) -> Path:
    """Where a scan lists its unreadable files: ``<out>.errors.csv`` next to the table."""
    out = Path(out)
    return out.with_name(out.name + ".errors.csv")


def _candidates(folder: Path) -> tuple[list[str], list[dict]]:
    """Every non-hidden file under ``folder`` (symlinked folders are not followed), as sorted POSIX paths, and the
    subfolders that could not be read (as errors rows: an archive with one locked folder is still scanned)."""
    found, unreadable = [], []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            listing = os.scandir(current)
        except OSError as error:
            relative = current.relative_to(folder).as_posix()
            unreadable.append({PATH_COLUMN: relative + "/", "error": f"folder not readable: {error.strerror}"})
            continue
        with listing as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    found.append(Path(entry.path).relative_to(folder).as_posix())
    return sorted(found), unreadable


@dataclass
class _Header:
    """What a scan needs from a DICOM file: the raw values of ``TAGS`` and where the pixel data element is."""

    transfer_syntax: str
    values: dict[int, bytes]
    little_endian: bool
    pixel: tuple[int, int] | None  # (value length, value offset in the file); None: the file has none
    pixel_checked: bool = True  # False for deflated files, whose file offsets say nothing


def _pydicom_header(path: Path, size: int) -> _Header:
    """Any DICOM pydicom reads: big endian, deflated, long headers; raises what pydicom raises."""
    with open(path, "rb") as handle:
        dataset = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=TAGS)
        transfer_syntax = str(dataset.file_meta.get("TransferSyntaxUID") or "")
        implicit, little = dataset.original_encoding
        start = handle.tell()
        element = handle.read(12)
    values = {}
    for tag in WANTED_TAGS:
        item = dataset.get_item(tag)
        if item is not None and item.value is not None:
            values[tag] = item.value if isinstance(item.value, bytes) else str(item.value).encode("utf-8")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # parsed from an inflated copy
        return _Header(transfer_syntax, values, little, None, pixel_checked=False)
    if len(element) < 8:
        return _Header(transfer_syntax, values, little, None)
    order = "<" if little else ">"
    group, number = struct.unpack(order + "HH", element[:4])
    tag = group << 16 | number
    if tag not in PIXEL_TAGS:
        raise ValueError(f"reading stopped at tag {tag:08X}, not at the pixel data")
    if implicit:
        pixel = struct.unpack(order + "I", element[4:8])[0], start + 8
    elif element[4:6] in LONG_LENGTH_VRS:
        pixel = struct.unpack(order + "I", element[8:12])[0], start + 12
    else:
        pixel = struct.unpack(order + "H", element[6:8])[0], start + 8
    return _Header(transfer_syntax, values, little, pixel)


def _text(header: _Header, keyword: str) -> str:
    """A text tag's value, stripped; non-ASCII values are decoded with the file's SpecificCharacterSet."""
    raw = header.values.get(TAG_NUMBERS[keyword])
    if not raw:
        return ""
    if raw.isascii():
        return raw.decode("ascii").strip(" \x00")
    from pydicom.charset import convert_encodings, decode_bytes

    charset = header.values.get(TAG_NUMBERS["SpecificCharacterSet"], b"").decode("ascii", "replace").strip(" \x00")
    try:
        text = decode_bytes(raw, convert_encodings(charset.split("\\") if charset else None), set())
    except (LookupError, ValueError):
        text = raw.decode("latin-1")
    return text.strip(" \x00")


def _number(header: _Header, keyword: str) -> int:
    """An integer tag (US, or IS text such as NumberOfFrames); 0 when absent or unreadable."""
    raw = header.values.get(TAG_NUMBERS[keyword])
    if not raw:
        return 0
    if keyword in SHORT_TAGS:
        return int.from_bytes(raw[:2], "little" if header.little_endian else "big")
    try:
        return int(raw.decode("ascii", "replace").strip(" \x00") or 0)
    except ValueError:
        return 0


def parse_age(value: str) -> float | None:
    """A DICOM age string (``nnnY/M/W/D``, or a bare number of years) in years; None when unreadable."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD]?)\s*", value.upper())
    if not match:
        return None
    return round(int(match.group(1)) * AGE_UNITS[match.group(2) or "Y"], 2)


def normalise_view(view_position: str, descriptions: list[str]) -> str:
    """PA / AP / L from ViewPosition, else the single view the descriptions name; blank when unknown."""
    view = view_position.upper()
    if view:
        return "L" if view in LATERAL_VIEWS else view
    named = {
        name for text in descriptions for name, pattern in DESCRIPTION_VIEWS.items() if pattern.search(text.upper())
    }
    return named.pop() if len(named) == 1 else ""


def _study_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if re.fullmatch(r"\d{8}", value) else value


@lru_cache(maxsize=64)
def _missing_decoder(uid: str) -> str | None:
    """The pip packages to install when pydicom cannot decode this transfer syntax here; None when it can."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    transfer_syntax = UID(uid)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return f"transfer syntax {transfer_syntax} has no pixel decoder in pydicom"
    if decoder.is_available:
        return None
    options = []
    for line in decoder.missing_dependencies:
        if " - requires " not in line:
            continue
        packages = re.split(r", | and ", line.split(" - requires ", 1)[1])
        names = [PIP_NAMES.get(n, n) for n in (re.split(r"[<>=!~ ]", p.strip())[0] for p in packages) if n != "numpy"]
        options.append("pip install " + " ".join(names))
    remedy = "; or ".join(options) or "a decoder plugin"
    return f"transfer syntax {transfer_syntax.name} needs a decoder that is not installed: {remedy}"


def _pixel_data_problem(header: _Header, size: int) -> str | None:
    """Why the pixel data cannot be decoded (absent, empty, cut off, no geometry); None when it looks whole."""
    if not header.pixel_checked:
        return None
    if header.pixel is None:
        return "no pixel data (not an image: a report, presentation state or directory)"
    length, start = header.pixel
    available = size - start
    if length == UNDEFINED:  # encapsulated (compressed) frames: at least the offset table item must follow
        return None if available >= 8 else "truncated file: the compressed pixel data is cut off"
    if length == 0:
        return "no pixel data (the pixel data element is empty)"
    if available < length:
        return f"truncated file: the pixel data needs {length} bytes, the file holds {available}"
    rows, columns, bits = (_number(header, k) for k in ("Rows", "Columns", "BitsAllocated"))
    if not rows or not columns or not bits:
        return "the image header lacks Rows, Columns or BitsAllocated; pixels cannot be decoded"
    if _text(header, "PhotometricInterpretation").startswith("YBR_FULL_422"):
        return None  # subsampled colour: the size rule below does not apply
    samples, frames = _number(header, "SamplesPerPixel") or 1, _number(header, "NumberOfFrames") or 1
    expected = -(-rows * columns * samples * frames * bits // 8)
    if length < expected:
        shape = f"{rows}×{columns}×{samples}×{frames} at {bits} bits"
        return f"truncated pixel data: {shape} needs {expected} bytes, has {length}"
    return None


def _read_dicom(path: Path) -> tuple[dict | None, str | None]:
    try:
        size = path.stat().st_size
        header = _pydicom_header(path, size)
    except InvalidDicomError:
        return None, "not a DICOM file (no DICM header)"
    except Exception as error:  # parsers raise many types; all mean "this header is unusable"
        return None, f"cannot read the DICOM header: {type(error).__name__}: {error}".strip()
    if not header.transfer_syntax:
        return None, "no TransferSyntaxUID in the file meta information; pixels cannot be decoded"
    problem = _pixel_data_problem(header, size) or _missing_decoder(header.transfer_syntax)
    if problem:
        return None, problem
    if not _text(header, "PhotometricInterpretation"):
        return None, "no PhotometricInterpretation; pixels cannot be decoded"
    descriptions = [_text(header, k) for k in ("SeriesDescription", "ProtocolName", "StudyDescription")]
    sex = _text(header, "PatientSex").upper()
    row = {
        "PatientID": _text(header, "PatientID"),
        "Sex": sex if sex in ("M", "F", "O") else "",
        "Age": parse_age(_text(header, "PatientAge")),
        "View": normalise_view(_text(header, "ViewPosition"), descriptions[:2]),
        "StudyInstanceUID": _text(header, "StudyInstanceUID"),
        "SeriesInstanceUID": _text(header, "SeriesInstanceUID"),
        "SOPInstanceUID": _text(header, "SOPInstanceUID"),
        "Modality": _text(header, "Modality").upper(),
        "BodyPart": _text(header, "BodyPartExamined").upper(),
        "StudyDate": _study_date(_text(header, "StudyDate")),
        "Institution": _text(header, "InstitutionName"),
        "Manufacturer": _text(header, "Manufacturer"),
        "_chest_words": bool(CHEST_WORDS.search(" ".join(descriptions).upper())),
    }
    return row, None


def _read_raster(path: Path) -> tuple[dict | None, str | None]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            kind = image.format
    except Exception as error:  # Pillow raises many types for a bad header
        return None, f"cannot read the image header: {type(error).__name__}: {error}"
    if kind not in ("PNG", "JPEG", "MPO"):
        return None, f"a {kind} file named {path.suffix}; only PNG, JPEG and DICOM are scanned"
    return {}, None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_one(job: tuple[str, str]) -> tuple[str, str, dict | None, str | None]:
    """(relative path, kind, row, error); kind is raster, dicom or "" for a file that is not an image."""
    folder, relative = job
    path = Path(folder, relative)
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return (relative, "raster", *_read_raster(path))
    if suffix in DICOM_SUFFIXES or _has_dicom_magic(path):
        return (relative, "dicom", *_read_dicom(path))
    return relative, "", None, None


def _chest_reason(kind: str, row: dict) -> str | None:
    if kind != "dicom":
        return "not DICOM: no Modality/BodyPartExamined to tell (--chest-only)"
    if row["Modality"] not in RADIOGRAPH_MODALITIES:
        return f"modality {row['Modality'] or 'blank'} is not a radiograph (--chest-only)"
    if row["BodyPart"]:
        return None if CHEST_WORDS.search(row["BodyPart"]) else f"body part {row['BodyPart']} (--chest-only)"
    return None if row["_chest_words"] else "body part blank, no chest in the descriptions (--chest-only)"


def _frontal_reason(row: dict) -> str | None:
    if row.get("View", "") in FRONTAL_VIEWS:
        return None
    return f"view {row.get('View') or 'unknown'} is not frontal (--frontal-only)"


def _results(folder: Path, relatives: list[str], workers: int, advance):
    """Each file's ``_read_one`` result in order, from a process pool for large folders."""
    jobs = [(str(folder), relative) for relative in relatives]
    with ExitStack() as stack:
        if workers > 1 and len(jobs) >= POOL_THRESHOLD:
            pool = stack.enter_context(worker_pool(workers, die_with_parent, (os.getpid(),)))
            results = pool.map(_read_one, jobs, chunksize=POOL_CHUNK)
        else:
            results = map(_read_one, jobs)
        done = 0
        for result in results:
            yield result
            done += 1
            if done % PROGRESS_EVERY == 0:
                advance(PROGRESS_EVERY)
        advance(done % PROGRESS_EVERY)


def scan_folder(
    folder: str | Path,
    *,
    chest_only: bool = False,
    frontal_only: bool = False,
    workers: int | None = None,
    show_progress: bool = True,
) -> ScanResult:
    """Walk ``folder`` for PNG/JPEG/DICOM files and read their tags into an image table.

    Rows are in sorted path order; ``Path`` is relative to ``folder``. ``workers`` processes read headers
    (default: one per core; pools start only for large folders). A folder with no image file, or whose every
    image is unreadable or left out, raises :class:`InputError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; pass the folder that holds the images")
    started = time.perf_counter()
    relatives, errors = _candidates(folder)
    workers = (os.cpu_count() or 1) if workers is None else workers
    rows, left_out = [], []
    with progress_bar("Scanning", total=len(relatives), unit="files", show=show_progress) as advance:
        for relative, kind, row, error in _results(folder, relatives, workers, advance):
            if not kind:
                continue
            if error is not None:
                errors.append({PATH_COLUMN: relative, "error": error})
                continue
            reason = (_chest_reason(kind, row) if chest_only else None) or (
                _frontal_reason(row) if frontal_only else None
            )
            if reason:
                left_out.append({PATH_COLUMN: relative, "reason": reason})
                continue
            rows.append({PATH_COLUMN: relative, **{k: v for k, v in row.items() if not k.startswith("_")}})
    seconds = time.perf_counter() - started
    images = len(rows) + len(errors) + len(left_out)
    if not images:
        raise InputError(
            f"{folder}: no PNG, JPEG or DICOM files found ({len(relatives)} files searched, subfolders included)"
        )
    errors_frame = pd.DataFrame(errors, columns=[PATH_COLUMN, "error"])
    left_out_frame = pd.DataFrame(left_out, columns=[PATH_COLUMN, "reason"])
    if not rows:
        if left_out:
            counts = "; ".join(f"{n} {reason}" for reason, n in Counter(r["reason"] for r in left_out).most_common())
            raise InputError(f"{folder}: every image was left out by the filters ({counts})")
        first = errors[0]
        raise InputError(
            f"{folder}: none of the {len(errors)} image files could be read "
            f"(first: {first[PATH_COLUMN]}: {first['error']})"
        )
    table = pd.DataFrame(rows, columns=list(SCAN_COLUMNS)).replace("", np.nan)
    table["Age"] = pd.to_numeric(table["Age"])
    return ScanResult(
        folder=folder,
        table=table,
        errors=errors_frame,
        left_out=left_out_frame,
        files_seen=len(relatives),
        seconds=seconds,
    )


def scan_csv_text(result: ScanResult) -> str:
    """The exact text ``xsel scan`` writes for this table (its SHA-256 is the table's provenance)."""
    return result.table.to_csv(index=False)


def write_scan(result: ScanResult, out: str | Path) -> tuple[Path, Path | None]:
    """Write the table to ``out`` and the unreadable files to ``<out>.errors.csv`` (a stale list is removed)."""
    data = scan_csv_text(result).encode("utf-8")
    written = write_atomic(out, lambda temporary: temporary.write_bytes(data))
    errors = write_errors_csv(
        scan_errors_path(out), result.errors[PATH_COLUMN].tolist(), result.errors["error"].tolist()
    )
    return written, errors
