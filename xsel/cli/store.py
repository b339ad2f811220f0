"""``xsel store …``: work on embedding stores (``store merge``: several stores of one encoder → one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.progress import notify

store_app = typer.Typer(help="Work on embedding stores: merge the parts of an archive embedded apart.")
app.add_typer(store_app, name="store")


@store_app.command("merge")
def merge_command(
    stores: Annotated[list[Path], typer.Argument(metavar="STORE.h5...", help="Two or more stores of one encoder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged store to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (the old one stays until done).")] = False,
) -> None:
    """Merge stores made by the same encoder (name, weights and preprocessing) into one.

    Rows keep the order of the stores given; metadata columns are the union (blank where a store lacks
    one). A path in two stores, or stores of different encoders, are refused naming both. The stores'
    errors files are merged into [italic]OUT.errors.csv[/italic]. Stores keep each CSV's Path values, so embed
    the parts from CSVs in one folder (or with one --image-root) for the merged paths to share one root.

    [bold]Examples[/bold]

      xsel embed part1.csv --out part1.h5 --device cuda     # one process per GPU…
      xsel embed part2.csv --out part2.h5 --device cuda
      xsel store merge part1.h5 part2.h5 --out archive.h5   # …then select once
      xsel select archive.h5 --k 20 --out to_label.csv
    """
    from xsel.store import merge_stores

    result = merge_stores(stores, out, overwrite=overwrite)
    for warning in result.warnings:
        notify(warning)
    failed = f"; failed images listed in {result.errors_csv}" if result.errors_csv else ""
    typer.echo(f"Merged {len(result.inputs)} stores, {result.rows} embeddings → {result.store}{failed}")
