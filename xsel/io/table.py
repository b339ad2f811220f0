"""Read and validate an input CSV of images (a ``Path`` column plus any carried columns)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xsel.errors import InputError
from xsel.io.atomic import write_atomic

PATH_COLUMN = "Path"


TEXT_COLUMNS = {PATH_COLUMN: str, "PatientID": str}


@dataclass(frozen=True)
class ImageTable:
    """An input CSV: ``frame`` keeps every column as read; ``files`` are the resolved image paths.

    For a folder, ``csv_path`` is the folder and ``scanned_sha256`` the SHA-256 of the CSV `xsel scan` writes.
    """

    csv_path: Path
    frame: pd.DataFrame
    files: list[Path]
    scanned_sha256: str | None = None

    @property
    def paths(self) -> list[str]:
        """The ``Path`` values verbatim, as stored in embedding stores and selection CSVs."""
        return self.frame[PATH_COLUMN].tolist()

    @property
    def source_sha256(self) -> str:
        """Provenance of the table: the CSV's SHA-256, the same for a folder and for its scanned CSV."""
        return self.scanned_sha256 or file_sha256(self.csv_path)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks so large files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_checked(csv_path: str | Path) -> pd.DataFrame:
    """Read a CSV with ``Path`` as text, turning every reading problem into a one-line :class:`InputError`."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: CSV file not found; pass the CSV that lists your images")
    try:
        frame = pd.read_csv(csv_path, dtype=TEXT_COLUMNS, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{csv_path}: the CSV is empty; it needs a header with a 'Path' column") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{csv_path}: cannot parse the CSV ({first_line})") from None
    if PATH_COLUMN not in frame.columns:
        found = ", ".join(map(str, frame.columns[:8])) or "none"
        raise InputError(f"{csv_path}: no 'Path' column (columns found: {found}); add one with image paths")
    return frame


def check_unique_paths(paths: pd.Series, csv_path: str | Path) -> None:
    """Refuse a CSV listing an image twice, naming both rows (spreadsheet numbering, header = row 1)."""
    duplicated = paths.duplicated(keep="first")
    if duplicated.any():
        index = int(duplicated.to_numpy().nonzero()[0][0])
        first = int((paths == paths.iloc[index]).to_numpy().nonzero()[0][0])
        raise InputError(
            f"{csv_path}: row {index + 2}, column 'Path' repeats {paths.iloc[index]!r} from row {first + 2}; "
            "remove the duplicate rows"
        )


def _scanned_frame(folder: Path, show_progress: bool) -> tuple[pd.DataFrame, str]:
    """A folder read as the CSV `xsel scan` would write for it, and that CSV's SHA-256."""
    from xsel.progress import notify
    from xsel.scan import scan_csv_text, scan_folder

    result = scan_folder(folder, show_progress=show_progress)
    if len(result.errors):
        first = result.errors.iloc[0]
        notify(
            f"{folder}: {len(result.errors)} unreadable files skipped (first: {first[PATH_COLUMN]}: {first['error']}); "
            f"`xsel scan {folder} --out images.csv` lists them all"
        )
    data = scan_csv_text(result).encode("utf-8")
    return pd.read_csv(io.BytesIO(data), dtype=TEXT_COLUMNS, keep_default_na=True), hashlib.sha256(data).hexdigest()


def read_image_table(
    csv_path: str | Path, image_root: str | Path | None = None, *, show_progress: bool = True
) -> ImageTable:
    """Load the CSV, check its ``Path`` column and resolve each path against the image root.

    Paths are relative to the CSV's folder unless ``image_root`` is given; absolute paths stay as they are.
    Rows are numbered as in a spreadsheet (header = row 1) in error messages. A folder instead of a CSV is
    scanned (:func:`xsel.scan.scan_folder`, progress on stderr) into the table `xsel scan` would write.
    """
    csv_path = Path(csv_path)
    scanned_sha256 = None
    if csv_path.is_dir():
        frame, scanned_sha256 = _scanned_frame(csv_path, show_progress)
        base = csv_path  # a scanned folder's paths are relative to the folder itself
    else:
        frame = read_csv_checked(csv_path)
        base = csv_path.parent
    if frame.empty:
        raise InputError(f"{csv_path}: the CSV has a header but no rows; list at least one image")
    paths = frame[PATH_COLUMN]
    blank = paths.isna() | (paths.astype(str).str.strip() == "")
    if blank.any():
        row = int(blank.to_numpy().nonzero()[0][0]) + 2
        raise InputError(f"{csv_path}: row {row}, column 'Path' is empty; every row needs an image path")
    check_unique_paths(paths, csv_path)
    if image_root is None:
        root = base
    else:
        root = Path(image_root)
        if not root.is_dir():
            raise InputError(f"--image-root {root}: folder not found")
    files = [locate(root, value) for value in paths]
    return ImageTable(csv_path=csv_path, frame=frame.reset_index(drop=True), files=files, scanned_sha256=scanned_sha256)


def locate(root: Path, value: str) -> Path:
    """The image file a ``Path`` value names: as written when that exists, else with surrounding spaces removed
    and Windows backslashes read as slashes (a CSV made on Windows or padded by a spreadsheet). Only finding the
    file changes: stores and selections keep the value verbatim (DESIGN: shared semantics), so rows still match
    the user's CSV. Only unusual values cost a file-system look-up."""
    if value == value.strip() and "\\" not in value:
        return root / value
    written = root / value
    return written if written.exists() else root / value.strip().replace("\\", "/")


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a CSV through a temporary file and a rename, so no partial file is ever seen."""
    return write_atomic(path, lambda temporary: frame.to_csv(temporary, index=False))


def write_errors_csv(path: str | Path, paths: list[str], messages: list[str]) -> Path | None:
    """List the images that failed (``Path``, ``error``) at ``path``, or remove a stale list when none did: an
    errors file from an earlier run would mislead. Returns the file written, if any."""
    path = Path(path)
    if not paths:
        path.unlink(missing_ok=True)
        return None
    return write_csv_atomic(pd.DataFrame({PATH_COLUMN: list(paths), "error": list(messages)}), path)
