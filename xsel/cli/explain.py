"""``xsel explain``: Grad-CAM heatmaps of a trained classifier's label, overlaid on the X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.cli.options import Device


@app.command("explain")
def explain_command(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="classifier.pt from `xsel train classifier` (or its run folder).")],
    csv: Annotated[Path, typer.Argument(help="CSV with a [bold]Path[/bold] column: the images to explain.")],
    label: Annotated[str, typer.Option(help="The classifier label whose evidence is mapped.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for overlays, heatmaps and contact_sheet.png.")],
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the Path values are relative to (default: the CSV's folder).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Linear probes only: the encoder weights the store was embedded with (none|imagenet|FILE)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward/backward pass.")] = 8,
    max_side: Annotated[int, typer.Option(help="Overlays and heatmaps at most this many pixels on the long side.")] = (
        1024
    ),
    device: Annotated[Device, typer.Option(help="Where the network runs; auto takes CUDA when present.")] = (
        Device.auto
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Grad-CAM heatmaps of LABEL: one overlay PNG and one heatmap .npy per image directly in --out, plus a
    contact sheet; images that fail to decode are skipped and listed in errors.csv.

    [bold]Examples[/bold]

      xsel explain runs/clf/classifier.pt to_check.csv --label Effusion --out cams/effusion
      xsel explain runs/probe/classifier.pt to_check.csv --label Edema --weights imagenet --out cams/edema
    """
    from xsel.io.outputs import claim_output
    from xsel.train.explain import explain

    ctx.with_resource(claim_output(out, kind="folder", inputs=[checkpoint, csv]))
    result = explain(
        checkpoint,
        csv,
        label,
        out,
        image_root=image_root,
        weights=weights,
        batch_size=batch_size,
        device=device.value,
        max_side=max_side,
        show_progress=not quiet,
    )
    failed = f"; {result.failed} could not be decoded (listed in {result.errors_csv})" if result.failed else ""
    typer.echo(
        f"Explained {len(result.table)} images for {result.label}{failed} → {result.out_dir} "
        f"(contact sheet: {result.contact_sheet})"
    )
