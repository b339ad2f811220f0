"""``xsel scan``: a folder of PNG/JPEG/DICOM files → an image CSV with DICOM tags in the standard columns."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.progress import notify


@app.command("scan")
def scan_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The image CSV to write (Path, PatientID, Sex, …).")],
    chest_only: Annotated[
        bool,
        typer.Option(help="Keep only chest radiographs: Modality CR/DX/DR/RG and a chest body part (DICOM only)."),
    ] = False,
    frontal_only: Annotated[bool, typer.Option(help="Keep only frontal views (View PA or AP).")] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes reading headers (default: one per core).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Read every image's DICOM tags (pixels are not decoded) into a CSV that every command takes.

    Columns: Path (relative to DIR), PatientID, Sex, Age (years), View (PA/AP/L), StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID, Modality, BodyPart, StudyDate, Institution (InstitutionName),
    Manufacturer; missing tags stay blank.
    Unreadable files (no pixel data, truncated, a transfer syntax without an installed decoder) are
    skipped and listed in [italic]OUT.errors.csv[/italic].

    [bold]Examples[/bold]

      xsel scan /data/pacs-export --out images.csv
      xsel scan /data/pacs-export --out chest.csv --chest-only --frontal-only
      xsel embed images.csv --out pool.h5        # or give the folder itself: xsel embed /data/pacs-export …
      xsel select pool.h5 --k 200 --balance Institution,Manufacturer --out to_label.csv   # merged archives
    """
    from xsel.io.outputs import claim_output
    from xsel.scan import SCAN_HEADER, scan_folder, write_scan

    # a rescan replaces the CSV an earlier scan wrote (its header), never another file; it may sit inside DIR
    ctx.with_resource(claim_output(out, kind="csv", header=SCAN_HEADER, overwrite=True))
    result = scan_folder(
        folder, chest_only=chest_only, frontal_only=frontal_only, workers=workers, show_progress=not quiet
    )
    written, errors_csv = write_scan(result, out)
    counts = result.left_out_counts
    if counts:
        view = Table(title=f"{len(result.left_out)} images left out")
        view.add_column("reason", overflow="fold")
        view.add_column("images", justify="right")
        for reason, count in counts.items():
            view.add_row(reason, str(count))
        Console().print(view)
    failed = f", {len(result.errors)} unreadable (listed in {errors_csv})" if errors_csv else ""
    left_out = f", {len(result.left_out)} left out" if counts else ""
    if written.absolute().parent.resolve() != folder.resolve():
        notify(f"Path values are relative to {folder}: pass --image-root {folder} with {written}")
    typer.echo(
        f"Scanned {result.files_seen} files in {result.seconds:.1f} s ({result.files_per_second:,.0f} files/s): "
        f"{len(result.table)} images{left_out}{failed} → {written}"
    )
