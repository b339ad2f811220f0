"""Hand a selection to the labelling tool the radiologists use: PNG conversions, a sidecar, the tool's import files.

Label Studio and CVAT do not read DICOM, so each picked image is decoded exactly as xsel sees it
(:func:`xsel.io.images.read_image`: VOI LUT / window applied, MONOCHROME1 inverted) and saved as an 8-bit
PNG named ``<rank>_<source stem>.png``. ``images.csv`` maps each PNG back to its source ``Path`` and DICOM
instance. Output folder (written to a temporary sibling and renamed when complete):

  images/                 the PNGs, in rank order (CVAT: also ``images/manifest.jsonl``)
  images.csv              Image, Path, rank, score, selector, PatientID, StudyInstanceUID, SeriesInstanceUID,
                          SOPInstanceUID (blank when the selection does not carry them)
  tasks.json              label-studio: one task per image; ``data`` holds the image URL and, as numbers and
                          text, rank, score and the metadata, so the Data Manager can sort and filter by them
  label_config.xml        label-studio: multi-label chest findings (Choices, choice="multiple")
  labels.json             cvat: the findings as tag labels, for the task's raw label editor

Label Studio image URLs: ``--url-prefix`` + the PNG's path inside the output folder when the PNGs are
served over HTTP, else Label Studio's local-files URL ``/data/local-files/?d=<path relative to the
document root>`` (start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to ``document_root``, and add a local-files storage for the folder).
The CVAT manifest follows CVAT's documented image manifest (version 1.1): a ``version`` line, a ``type``
line, then per image ``name`` (path without extension), ``extension``, ``width``, ``height`` and
``checksum`` (MD5 of the decoded pixels, as CVAT computes it); choose the ``predefined`` sorting method so
annotators see rank order. The PNGs hold no DICOM header, but pixels may show burned-in text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from xsel.errors import InputError
from xsel.io.atomic import replace_folder
from xsel.io.images import ImageDecodeError, read_image
from xsel.io.outputs import safe_name
from xsel.io.table import PATH_COLUMN, check_unique_paths, read_csv_checked, read_image_table
from xsel.progress import progress_bar

FORMATS = ("label-studio", "cvat", "csv")
CHEXPERT_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
SIDECAR_COLUMNS = (
    "Image",
    PATH_COLUMN,
    "rank",
    "score",
    "selector",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
TASK_FIELDS = (
    "rank",
    "score",
    "selector",
    PATH_COLUMN,
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "View",
    "Sex",
    "Age",
    "StudyDate",
)
CVAT_MANIFEST_VERSION = "1.1"


@dataclass
class LabelExport:
    """What :func:`export_labels` wrote: the folder, the sidecar table and the picks that could not be read."""

    out_dir: Path
    images: pd.DataFrame
    files: list[Path]
    errors: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def _stem(path: str) -> str:
    return safe_name(Path(str(path)).stem, "image")


def _json_value(value):
    """A JSON-safe cell: numbers stay numbers (so Label Studio sorts them), blanks become null."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


def label_studio_config(findings: tuple[str, ...] | list[str]) -> str:
    """A Label Studio labelling config: the image with zoom/brightness/contrast, findings as multiple choice."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(f)}/>" for f in findings)
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true" zoomControl="true" '
        'brightnessControl="true" contrastControl="true"/>\n'
        '  <Header value="Findings: select all that apply"/>\n'
        '  <Choices name="findings" toName="image" choice="multiple" showInline="false">\n'
        f"{choices}\n"
        "  </Choices>\n"
        '  <TextArea name="comment" toName="image" placeholder="Comment (optional)" maxSubmissions="1"/>\n'
        "</View>\n"
    )


def _selection(selection_csv: Path) -> pd.DataFrame:
    frame = read_csv_checked(selection_csv)
    if frame.empty:
        raise InputError(f"{selection_csv}: the selection has no rows; nothing to export")
    blank = frame[PATH_COLUMN].isna()
    if blank.any():
        row = int(blank.to_numpy().nonzero()[0][0]) + 2
        raise InputError(f"{selection_csv}: row {row}, column 'Path' is empty; every pick needs an image path")
    check_unique_paths(frame[PATH_COLUMN], selection_csv)
    if "rank" not in frame.columns:
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    elif not pd.api.types.is_numeric_dtype(frame["rank"]) or frame["rank"].isna().any():
        raise InputError(f"{selection_csv}: column 'rank' must hold a number on every row (as `xsel select` writes)")
    return frame.sort_values("rank", kind="stable").reset_index(drop=True)


def _source_files(
    selection: pd.DataFrame, selection_csv: Path, image_root, images_csv
) -> tuple[list[Path], pd.DataFrame]:
    """Resolve each pick's file and fill metadata columns the selection lacks from ``images_csv`` (by Path)."""
    if images_csv is not None:
        table = read_image_table(images_csv, image_root, show_progress=False)
        located = dict(zip(table.paths, table.files, strict=True))
        missing = [p for p in selection[PATH_COLUMN] if p not in located]
        if missing:
            raise InputError(
                f"{selection_csv}: {len(missing)} picks are not in {images_csv} (first: {missing[0]!r}); "
                "pass the image CSV or folder the selection was made from"
            )
        carried = [c for c in table.frame.columns if c == PATH_COLUMN or c not in selection.columns]
        extra = table.frame[carried]
        selection = selection.merge(extra, on=PATH_COLUMN, how="left", sort=False)
        return [located[p] for p in selection[PATH_COLUMN]], selection
    if image_root is not None and not Path(image_root).is_dir():
        raise InputError(f"--image-root {image_root}: folder not found")
    root = Path(image_root) if image_root is not None else selection_csv.parent
    return [root / p for p in selection[PATH_COLUMN]], selection


def _to_png(gray: np.ndarray, max_side: int | None) -> Image.Image:
    image = Image.fromarray(np.clip(np.round(gray * 255.0), 0, 255).astype(np.uint8), mode="L")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _image_url(relative: str, out_dir: Path, url_prefix: str | None, document_root: Path) -> str:
    if url_prefix is not None:
        return url_prefix + quote(relative)
    return "/data/local-files/?d=" + quote(Path(os.path.relpath(out_dir / relative, document_root)).as_posix())


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def export_labels(
    selection_csv: str | Path,
    out_dir: str | Path,
    *,
    format: str = "label-studio",
    image_root: str | Path | None = None,
    images_csv: str | Path | None = None,
    max_side: int | None = None,
    findings: tuple[str, ...] | list[str] = CHEXPERT_FINDINGS,
    url_prefix: str | None = None,
    document_root: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> LabelExport:
    """Convert a selection's images to PNG and write the labelling tool's import files into ``out_dir``.

    Paths resolve against ``image_root``, else the folder of ``images_csv`` (the image CSV or folder the
    selection came from, which also fills SOPInstanceUID and other columns the selection lacks), else the
    selection CSV's folder. Unreadable picks are skipped into ``errors.csv`` with a warning; none readable
    is an :class:`InputError`. ``document_root`` (default: the parent of ``out_dir``) is Label Studio's
    local-files root.
    """
    if format not in FORMATS:
        raise InputError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if max_side is not None and max_side < 8:
        raise InputError(f"--max-side {max_side}: give at least 8 pixels")
    findings = [f.strip() for f in findings if f.strip()]
    if not findings or len(set(findings)) != len(findings):
        raise InputError(f"--findings {','.join(findings)}: give distinct, non-empty finding names")
    selection_csv, out_dir = Path(selection_csv), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} exists; pass --overwrite to replace it (it stays until the export is complete)")
    document_root = (Path(document_root) if document_root is not None else out_dir.absolute().parent).resolve()
    if format == "label-studio" and url_prefix is None and not out_dir.resolve().is_relative_to(document_root):
        raise InputError(
            f"--out {out_dir} is not inside the Label Studio document root {document_root}; "
            "pass --document-root or --url-prefix"
        )
    selection = _selection(selection_csv)
    files, selection = _source_files(selection, selection_csv, image_root, images_csv)

    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.absolute().with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    (temporary / "images").mkdir(parents=True)
    try:
        rows, manifest, errors = [], [], []
        with progress_bar("Converting", total=len(files), show=show_progress) as advance:
            for (_, pick), source in zip(selection.iterrows(), files, strict=True):
                advance(1)
                try:
                    image = _to_png(read_image(source), max_side)
                except ImageDecodeError as error:
                    errors.append({PATH_COLUMN: pick[PATH_COLUMN], "error": str(error)})
                    continue
                relative = f"images/{int(pick['rank']):04d}_{_stem(pick[PATH_COLUMN])}.png"
                image.save(temporary / relative, optimize=False)
                rows.append((relative, pick))
                manifest.append(
                    {
                        "name": relative[len("images/") : -len(".png")],
                        "extension": ".png",
                        "width": image.width,
                        "height": image.height,
                        "checksum": hashlib.md5(image.tobytes()).hexdigest(),
                    }
                )
        if not rows:
            first = errors[0]
            raise InputError(
                f"{selection_csv}: none of the {len(files)} picks could be read "
                f"(first: {first[PATH_COLUMN]}: {first['error']}); check --image-root or --csv"
            )
        sidecar = pd.DataFrame(
            [{"Image": relative, **{c: pick.get(c) for c in SIDECAR_COLUMNS[1:]}} for relative, pick in rows],
            columns=list(SIDECAR_COLUMNS),
        )
        sidecar.to_csv(temporary / "images.csv", index=False)
        written = [out_dir / "images.csv"]
        errors_frame = pd.DataFrame(errors, columns=[PATH_COLUMN, "error"])
        if errors:
            errors_frame.to_csv(temporary / "errors.csv", index=False)
            written.append(out_dir / "errors.csv")
        if format == "label-studio":
            tasks = []
            for relative, pick in rows:
                data = {"image": _image_url(relative, out_dir.resolve(), url_prefix, document_root)}
                data.update({c: _json_value(pick[c]) for c in TASK_FIELDS if c in pick.index})
                data["rank"] = int(pick["rank"])
                tasks.append({"data": data})
            _write_json(temporary / "tasks.json", tasks)
            (temporary / "label_config.xml").write_text(label_studio_config(findings), encoding="utf-8")
            written += [out_dir / "tasks.json", out_dir / "label_config.xml"]
        elif format == "cvat":
            lines = [{"version": CVAT_MANIFEST_VERSION}, {"type": "images"}, *manifest]
            text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            (temporary / "images" / "manifest.jsonl").write_text(text, encoding="utf-8")
            _write_json(temporary / "labels.json", [{"name": f, "type": "tag", "attributes": []} for f in findings])
            written += [out_dir / "images" / "manifest.jsonl", out_dir / "labels.json"]
        replace_folder(temporary, out_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    warnings = []
    if errors:
        warnings.append(
            f"{len(errors)} of {len(files)} picks could not be read and are not exported; see {out_dir}/errors.csv"
        )
    return LabelExport(out_dir=out_dir, images=sidecar, files=written, errors=errors_frame, warnings=warnings)
