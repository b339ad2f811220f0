"""The ``xsel`` command line: one Typer app, a module per command, each a thin layer over the library."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from xsel import __version__
from xsel.errors import XselError
from xsel.progress import notify


class _XselGroup(TyperGroup):
    """Turns the library's errors into one red line on stderr and their exit code, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XselError as error:
            notify(str(error), label="error", style="bold red")
            ctx.exit(error.exit_code)


app = typer.Typer(
    cls=_XselGroup,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    add_completion=False,
    no_args_is_help=True,
    help="Choose which K medical images to label. Run [bold]xsel demo[/bold] to see the whole pipeline.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xsel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Choose which K medical images to label."""


from xsel.cli import demo, embed, evaluate, explain, export, plugins, select, train  # noqa: E402  (commands register on `app`)

__all__ = ["app", "demo", "embed", "evaluate", "explain", "export", "main", "plugins", "select", "train"]


def main() -> None:
    """Console-script entry point."""
    app()
