"""``xsel plugins``: what is installed and what each plugin registered."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.plugins import list_plugins


@app.command("plugins")
def plugins_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list for scripts instead of a table.")] = False,
) -> None:
    """List every encoder, selector and classifier with the plugin, distribution and version it comes from.

    [bold]Examples[/bold]

      xsel plugins
      xsel plugins --json | jq '.[] | select(.kind == "encoder") | .name'
      XSEL_LOAD_PLUGINS= xsel plugins     # built-ins only
    """
    rows = list_plugins()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="xsel plugins")
    for column in ("kind", "name", "plugin", "distribution", "version"):
        table.add_column(column, no_wrap=True)
    table.add_column("description", overflow="fold", ratio=1)
    for row in rows:
        name = row["name"] + (f" ({', '.join(row['aliases'])})" if row["aliases"] else "")
        table.add_row(row["kind"], name, row["plugin"], row["distribution"], row["version"], row["description"])
    Console().print(table)
