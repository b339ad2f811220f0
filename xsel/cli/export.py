"""``xsel export``: an encoder and a learned selector → an ONNX bundle for hospital sites."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (conventionally exports/NAME).")],
    encoder: Annotated[str, typer.Option(help="Encoder plugin; see `xsel plugins`.")] = "resnet18",
    weights: Annotated[str | None, typer.Option(help="Weights as in `xsel embed`.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override the encoder's input size.")] = None,
    selector: Annotated[
        str | None,
        typer.Option(
            help="A learned selector to include: RUN_DIR/selector.pt (MedSelect), or NAME=CHECKPOINT for any learned "
            "selector plugin."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Export the encoder (and a learned selector) to ONNX with a verified manifest.

    Each model is checked against PyTorch on seeded inputs (several batch sizes; pool sizes other than
    the export example, one smaller than K); a failed check writes nothing.

    [bold]Examples[/bold]

      xsel export --encoder resnet18 --weights moco.pth.tar --selector runs/sel/selector.pt --out exports/cxr
      xsel export --encoder efficientnet-lite0 --out exports/effnet       # encoder only: sites use baselines
    """
    from xsel.train.export import export_bundle

    manifest = export_bundle(
        out, encoder=encoder, weights=weights, image_size=image_size, selector=selector, overwrite=overwrite
    )
    parity = manifest["parity"]
    worst = max(check["max_abs_diff"] for check in parity["encoder"] + parity["selector"])
    parts = ", ".join(manifest["sha256"])
    typer.echo(
        f"Exported {parts} + manifest.json → {out} (opset {manifest['opset']}; parity vs PyTorch passed, "
        f"max abs difference {worst:.1e})"
    )
