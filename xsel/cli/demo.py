"""``xsel demo``: the whole pipeline on built-in synthetic chest images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.cli.evaluate import print_summary


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's images, CSV and store.")] = Path(
        "demo-output"
    ),
    encoder: Annotated[str, typer.Option(help="Encoder plugin used for the embeddings.")] = "pixels",
    weights: Annotated[str | None, typer.Option(help="Weights for the encoder (see `xsel embed --help`).")] = None,
    images: Annotated[int, typer.Option(help="How many synthetic images to generate.")] = 600,
    episodes: Annotated[int, typer.Option(help="Evaluation episodes per condition.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Generate synthetic chest X-rays with labels, embed them, compare selectors and pick K to label.

    [bold]Examples[/bold]

      xsel demo
      xsel demo --out /tmp/xsel-demo --encoder efficientnet-lite0 --images 1000
    """
    from xsel.demo import CONDITIONS, NEGATIVE, run_demo
    from xsel.errors import InputError

    if images < 200:
        raise InputError(f"--images {images}: use at least 200 so every condition has enough images for episodes")
    result = run_demo(
        out, encoder=encoder, weights=weights, n_images=images, episodes=episodes, seed=seed, show_progress=not quiet
    )
    labels = result.labels
    table = Table(title=f"xsel demo: {len(labels)} synthetic images, {labels['PatientID'].nunique()} patients")
    for column in ("label", "positive (1)", "uncertain (-1)", "negative (0)", "blank"):
        table.add_column(column, justify="right" if column != "label" else "left")
    for condition in (*CONDITIONS, NEGATIVE):
        values = labels[condition]
        table.add_row(
            condition,
            str(int((values == 1).sum())),
            str(int((values == -1).sum())),
            str(int((values == 0).sum())),
            str(int(values.isna().sum())),
        )
    console = Console()
    console.print(table)
    embedded = result.embed
    console.print(
        f"Embeddings: {embedded.embedded} × {embedded.embedding_dim} ({embedded.encoder}) in "
        f"{embedded.seconds:.1f} s, {embedded.images_per_second:.1f} images/s → {result.store}",
        soft_wrap=True,
    )
    print_summary(result.evaluation, console)
    picked = result.selection.table
    console.print(
        f"Selected {len(picked)} of {result.selection.pool_size} images to label with typiclust → "
        f"{result.out_dir / 'selection.csv'}",
        soft_wrap=True,
    )
    console.print(f"Images and labels: {result.csv}; evaluation: {result.out_dir / 'evaluation'}", soft_wrap=True)
