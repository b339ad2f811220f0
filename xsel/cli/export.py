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
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: a statically quantized encoder (onnxruntime, QDQ) for faster CPU encoding at sites."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="With --quantize: CSV or image folder of images like those the sites will select."),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option(help="With --quantize: images drawn (seeded) from --calibration to calibrate and check.")
    ] = 200,
    min_agreement: Annotated[
        float,
        typer.Option(
            help="With --quantize: fraction of the K=20 site picks on the calibration images that must "
            "stay those of the fp32 encoder (0: record it, require nothing)."
        ),
    ] = 0.95,
) -> None:
    """Export the encoder (and a learned selector) to ONNX with a verified manifest.

    Each model is checked against PyTorch on seeded inputs (several batch sizes; pool sizes other than
    the export example, one smaller than K); a failed check writes nothing. With --quantize int8 the site
    selection on the calibration images must also agree with the fp32 encoder's, or nothing is written.

    [bold]Examples[/bold]

      xsel export --encoder resnet18 --weights moco.pth.tar --selector runs/sel/selector.pt --out exports/cxr
      xsel export --encoder efficientnet-lite0 --out exports/effnet       # encoder only: sites use baselines
      xsel export --encoder resnet18 --weights moco.pth.tar --quantize int8 --calibration images.csv --out exports/q8
    """
    from xsel.train.export import export_bundle

    manifest = export_bundle(
        out,
        encoder=encoder,
        weights=weights,
        image_size=image_size,
        selector=selector,
        overwrite=overwrite,
        quantize=quantize,
        calibration=calibration,
        calibration_images=calibration_images,
        min_agreement=min_agreement,
    )
    parity = manifest["parity"]
    worst = max(check["max_abs_diff"] for check in parity["encoder"] + parity["selector"])
    parts = ", ".join(manifest["sha256"])
    typer.echo(
        f"Exported {parts} + manifest.json → {out} (opset {manifest['opset']}; parity vs PyTorch passed, "
        f"max abs difference {worst:.1e})"
    )
    quantization = manifest.get("quantization")
    if quantization:
        agreement = quantization["agreement"]
        typer.echo(
            f"Encoder quantized to int8 on {quantization['calibration']['images']} calibration images: "
            f"{agreement['picks_unchanged']:.0%} of the K={agreement['k']} {agreement['selector']} picks unchanged, "
            f"embedding cosine min {agreement['cosine_min']:.4f}, mean {agreement['cosine_mean']:.4f}"
        )
