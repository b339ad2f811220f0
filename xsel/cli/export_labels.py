"""``xsel export-labels``: a selection → PNGs, a sidecar back to each DICOM instance, and a labelling tool's files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.progress import notify

LABEL_FILES = ("images", "images.csv", "errors.csv", "tasks.json", "label_config.xml", "labels.json")  # all it writes


class LabelFormat(str, Enum):
    label_studio = "label-studio"
    cvat = "cvat"
    csv = "csv"


@app.command("export-labels")
def export_labels_command(
    ctx: typer.Context,
    selection: Annotated[Path, typer.Argument(metavar="SELECTION.csv", help="A selection from `xsel select`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (images/, images.csv, tool files).")],
    format: Annotated[
        LabelFormat, typer.Option("--format", "-f", help="label-studio (tasks.json + config), cvat (manifest), csv.")
    ] = LabelFormat.label_studio,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the Path values are relative to (default: the CSV's folder).")
    ] = None,
    images_csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="The image CSV or folder the selection was made from: resolves paths and adds its DICOM columns.",
        ),
    ] = None,
    max_side: Annotated[
        int | None, typer.Option(help="Shrink PNGs whose longer side is above this many pixels.")
    ] = None,
    findings: Annotated[
        str | None, typer.Option(help="Comma-separated findings to label (default: the 14 CheXpert observations).")
    ] = None,
    url_prefix: Annotated[
        str | None, typer.Option(help="Label Studio: URL the output folder is served at (default: local files).")
    ] = None,
    document_root: Annotated[
        Path | None,
        typer.Option(help="Label Studio: its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: --out's parent)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder (the old one stays until done).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert the picked images to 8-bit PNGs (DICOM windowed, MONOCHROME1 inverted) for the annotators.

    Writes [italic]images/[/italic] (rank order), [italic]images.csv[/italic] (each PNG → Path, SOPInstanceUID,
    StudyInstanceUID, PatientID, rank, score, selector) and the tool's import files: Label Studio
    [italic]tasks.json[/italic] (score and metadata as task data: sortable in the Data Manager) with
    [italic]label_config.xml[/italic]; CVAT [italic]images/manifest.jsonl[/italic] with [italic]labels.json[/italic].

    [bold]Examples[/bold]

      xsel export-labels to_label.csv --format label-studio --out queue/ --csv /data/pacs-export
      xsel export-labels to_label.csv --format cvat --out queue-cvat/ --image-root /data/images --max-side 2048
    """
    from xsel.io.outputs import claim_output
    from xsel.labelling import CHEXPERT_FINDINGS, export_labels

    inputs = [selection, images_csv if images_csv is not None and images_csv.is_file() else None]
    ctx.with_resource(claim_output(out, kind="folder", names=LABEL_FILES, inputs=inputs, overwrite=overwrite))
    result = export_labels(
        selection,
        out,
        format=format.value,
        image_root=image_root,
        images_csv=images_csv,
        max_side=max_side,
        findings=findings.split(",") if findings else CHEXPERT_FINDINGS,
        url_prefix=url_prefix,
        document_root=document_root,
        overwrite=overwrite,
        show_progress=not quiet,
    )
    for warning in result.warnings:
        notify(warning)
    typer.echo(f"Exported {len(result.images)} images for {format.value} → {result.out_dir}")
    for path in result.files:
        typer.echo(f"  {path}")
