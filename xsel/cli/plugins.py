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
    """List every encoder, selector and classifier with the plugin, distribution and version it comes from,
    and the named weight sets of each encoder (`--weights`; `none` and a local file work everywhere).

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
    table.add_column("kind", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("from")
    table.add_column("weights")
    table.add_column("description", ratio=1)
    for row in rows:
        aliases = f" (alias: {', '.join(row['aliases'])})" if row["aliases"] else ""
        source = f"{row['distribution']} {row['version']}, plugin {row['plugin']}"
        table.add_row(row["kind"], row["name"], source, ", ".join(row["weights"]), row["description"] + aliases)
    Console().print(table)
