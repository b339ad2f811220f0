"""The ``xsel`` command line: one Typer app, a module per command, each a thin layer over the library."""

from __future__ import annotations

import inspect

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


from xsel.cli import demo, embed, evaluate, explain, export, export_labels, plugins, scan, select, store, train  # noqa: E402  (commands register on `app`)


def reflow(doc: str | None) -> str | None:
    """A docstring as help text: paragraphs wrapped for the source become one line each (the terminal wraps them),
    indented blocks (examples) keep their lines."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        paragraph if paragraph.startswith(" ") else " ".join(line.strip() for line in paragraph.splitlines())
        for paragraph in paragraphs
    )


def _reflow_help(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        command.help = command.help or reflow(command.callback.__doc__ if command.callback else None)
    for group in typer_app.registered_groups:
        group.typer_instance.info.help = reflow(group.typer_instance.info.help)
        _reflow_help(group.typer_instance)


_reflow_help(app)

__all__ = [
    "app",
    "demo",
    "embed",
    "evaluate",
    "explain",
    "export",
    "export_labels",
    "main",
    "plugins",
    "scan",
    "select",
    "store",
    "train",
]


def main() -> None:
    """Console-script entry point."""
    app()
