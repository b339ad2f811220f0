"""``xsel embed``: images listed in a CSV → an HDF5 embedding store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.cli.options import Device, Precision


class Runtime(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command("embed")
def embed_command(
    csv: Annotated[Path, typer.Argument(help="CSV with a [bold]Path[/bold] column (PNG, JPEG or DICOM files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HDF5 embedding store to write.")],
    encoder: Annotated[str, typer.Option(help="Encoder plugin; see `xsel plugins`.")] = "resnet18",
    weights: Annotated[
        str | None,
        typer.Option(help="'none' (seeded random init), 'imagenet', a state-dict file or a MoCo checkpoint."),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the Path values are relative to (default: the CSV's folder).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="Decode worker processes (0 = decode in this process; default: one per core, at most 8)."),
    ] = None,
    device: Annotated[Device, typer.Option(help="Where the encoder runs; auto takes CUDA when present.")] = Device.auto,
    precision: Annotated[
        Precision,
        typer.Option(help="auto: fp16 AMP on CUDA, exact fp32 on CPU; bf16 is ~2× faster on recent CPUs."),
    ] = Precision.auto,
    image_size: Annotated[int | None, typer.Option(help="Override the encoder's input size in pixels.")] = None,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run, embedding only what is missing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (the old one stays until done).")] = False,
    runtime: Annotated[
        Runtime,
        typer.Option(
            help="auto: onnxruntime when installed and its exported encoder matches PyTorch (fp32, local engine; "
            "1.4–2.8× on CPUs), else PyTorch; torch; or onnx (an error when it cannot run). The exported encoder "
            "is cached per encoder in $XSEL_CACHE_DIR (default ~/.cache/xsel)."
        ),
    ] = Runtime.auto,
    engine: Annotated[
        Engine, typer.Option(help="local: this machine; ray: a Ray cluster (pip install 'xsel[ray]').")
    ] = Engine.local,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (auto, ray://host:port); default: start a local one.")
    ] = None,
    num_gpus_per_worker: Annotated[float, typer.Option(help="Ray engine: GPUs per encoder actor.")] = 0.0,
    concurrency: Annotated[int | None, typer.Option(help="Ray engine: number of encoder actors.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Embed every image of CSV with an encoder plugin into an HDF5 store.

    Images that fail to decode are skipped and listed in [italic]STORE.errors.csv[/italic];
    the store appears only once complete, and [bold]--resume[/bold] continues a killed run.

    [bold]Examples[/bold]

      xsel embed pool.csv --out pool.h5 --encoder resnet18 --weights imagenet
      xsel embed pool.csv --out pool.h5 --encoder resnet18 --weights moco.pth.tar --image-size 320
      xsel embed pool.csv --out pool.h5 --encoder pixels          # no weights, no GPU needed
      xsel embed pool.csv --out pool.h5 --resume                  # after an interruption
      xsel embed pool.csv --out pool.h5 --engine ray --address auto --num-gpus-per-worker 1
    """
    from xsel.embed import embed

    result = embed(
        csv,
        out,
        encoder=encoder,
        weights=weights,
        image_root=image_root,
        batch_size=batch_size,
        workers=workers,
        device=device.value,
        precision=precision.value,
        image_size=image_size,
        resume=resume,
        overwrite=overwrite,
        runtime=runtime.value,
        engine=engine.value,
        address=address,
        num_gpus_per_worker=num_gpus_per_worker,
        concurrency=concurrency,
        show_progress=not quiet,
    )
    if result.resumed_rows == result.rows:
        typer.echo(f"{result.store} is already complete ({result.embedded} embeddings); nothing to do.")
        return
    failed = f", {result.failed} failed (listed in {result.errors_csv})" if result.failed else ""
    resumed = f", {result.resumed_rows} from the interrupted run" if result.resumed_rows else ""
    typer.echo(
        f"Embedded {result.embedded} of {result.rows} images{failed}{resumed} with {result.encoder} "
        f"({result.embedding_dim}-d) on {result.device} with {result.runtime} in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s) → {result.store}"
    )
