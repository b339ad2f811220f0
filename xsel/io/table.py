"""Read and validate an input CSV of images (a ``Path`` column plus any carried columns)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xsel.errors import InputError

PATH_COLUMN = "Path"


@dataclass(frozen=True)
class ImageTable:
    """An input CSV: ``frame`` keeps every column as read; ``files`` are the resolved image paths."""

    csv_path: Path
    frame: pd.DataFrame
    files: list[Path]

    @property
    def paths(self) -> list[str]:
        """The ``Path`` values verbatim, as stored in embedding stores and selection CSVs."""
        return self.frame[PATH_COLUMN].tolist()


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
        frame = pd.read_csv(csv_path, dtype={PATH_COLUMN: str, "PatientID": str}, keep_default_na=True)
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


def read_image_table(csv_path: str | Path, image_root: str | Path | None = None) -> ImageTable:
    """Load the CSV, check its ``Path`` column and resolve each path against the image root.

    Paths are relative to the CSV's folder unless ``image_root`` is given; absolute paths stay as they are.
    Rows are numbered as in a spreadsheet (header = row 1) in error messages.
    """
    csv_path = Path(csv_path)
    frame = read_csv_checked(csv_path)
    if frame.empty:
        raise InputError(f"{csv_path}: the CSV has a header but no rows; list at least one image")
    paths = frame[PATH_COLUMN]
    blank = paths.isna() | (paths.astype(str).str.strip() == "")
    if blank.any():
        row = int(blank.to_numpy().nonzero()[0][0]) + 2
        raise InputError(f"{csv_path}: row {row}, column 'Path' is empty; every row needs an image path")
    check_unique_paths(paths, csv_path)
    if image_root is None:
        root = csv_path.parent
    else:
        root = Path(image_root)
        if not root.is_dir():
            raise InputError(f"--image-root {root}: folder not found")
    files = [root / value for value in paths]
    return ImageTable(csv_path=csv_path, frame=frame.reset_index(drop=True), files=files)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a CSV through a temporary file and a rename, so no partial file is ever seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        frame.to_csv(temporary, index=False)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
