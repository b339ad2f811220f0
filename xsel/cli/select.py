"""``xsel select``: pick the K images to label from a store's pool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.progress import stderr


@app.command("select")
def select_command(
    store: Annotated[Path, typer.Argument(help="Embedding store (from `xsel embed`) holding the pool.")],
    k: Annotated[int, typer.Option("--k", "-k", help="How many images to label.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Selection CSV to write (rank, Path, score, selector, …).")],
    selector: Annotated[
        str | None, typer.Option(help="Selector plugin (default: medselect with --checkpoint, else typiclust).")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A learned selector's checkpoint (RUN_DIR/selector.pt from `xsel train selector`)."),
    ] = None,
    exclude: Annotated[
        Path | None,
        typer.Option(help="CSV whose Path column lists images already labelled (e.g. an earlier selection)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for every random choice; the same seed gives the same selection.")
    ] = 0,
    allow_same_patient: Annotated[
        bool, typer.Option(help="Allow several images of one PatientID (default: first image per patient).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the selection as JSON records on stdout.")] = False,
) -> None:
    """Choose K images to label from the pool in STORE and write them, best first, to a CSV.

    [bold]Examples[/bold]

      xsel select pool.h5 --k 20 --out to_label.csv
      xsel select pool.h5 --k 20 --out round2.csv --selector kcenter --exclude to_label.csv
      xsel select pool.h5 --k 50 --out picks.csv --selector probcover --seed 7 --json | jq '.[0]'
      xsel select pool.h5 --k 20 --out picks.csv --checkpoint runs/sel/selector.pt
    """
    from xsel.io.table import write_csv_atomic
    from xsel.selection import select

    selection = select(
        store,
        k,
        selector=selector,
        checkpoint=checkpoint,
        seed=seed,
        exclude=exclude,
        allow_same_patient=allow_same_patient,
    )
    for warning in selection.warnings:
        stderr.print(f"[yellow]note:[/yellow] {warning}", soft_wrap=True)
    write_csv_atomic(selection.table, out)
    table = selection.table
    if as_json:
        typer.echo(table.to_json(orient="records", indent=2))
        return
    name = table["selector"].iloc[0]
    view = Table(title=f"{len(table)} of {selection.pool_size} images selected with {name} → {out}")
    shown = ["rank", "Path", *[c for c in ("PatientID", "View", "Sex", "Age") if c in table.columns]]
    for column in shown:
        view.add_column(column, overflow="fold")
    for _, row in table.head(25).iterrows():
        view.add_row(*["" if row[c] != row[c] else str(row[c]) for c in shown])
    Console().print(view)
    if len(table) > 25:
        typer.echo(f"… and {len(table) - 25} more in {out}")
