"""The ``xsel`` command line: one Typer app, a module per command, each a thin layer over the library."""

from __future__ import annotations

import inspect
import sys

import typer
from typer.core import TyperGroup

from xsel import __version__
from xsel.errors import XselError
from xsel.io.outputs import describe_os_error
from xsel.progress import notify


def _fail(message: str) -> None:
    notify(" ".join(message.split()), label="error", style="bold red")


class _XselGroup(TyperGroup):
    """The error boundary: every failure becomes one red line on stderr and an exit code, never a traceback.

    xsel's errors exit with their code; a full disk, a quota or a refused write exit 2 (the machine, not xsel);
    Ctrl-C exits 130, saying how to go on; usage errors (a bad or missing option) exit 2 in one line.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XselError as error:
            _fail(str(error))
            ctx.exit(error.exit_code)
        except OSError as error:
            message = describe_os_error(error)
            if message is None:
                raise
            _fail(message)
            ctx.exit(2)
        except KeyboardInterrupt:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            resumes = any(param.name == "resume" for param in getattr(command, "params", ()))
            _fail("interrupted; rerun with --resume" if resumes else "interrupted")
            ctx.exit(130)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as error:  # click's usage errors, public in typer as their base class
            context = getattr(error, "ctx", None)
            if type(error).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                see = f" See '{context.command_path} {context.help_option_names[-1]}'." if context else ""
                _fail(error.format_message().rstrip(".") + "." + see)
            sys.exit(error.exit_code)
        except typer.Abort:
            _fail("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


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
for _group in app.registered_groups:  # `train …`, `store …`: the same boundary, so it knows the command that ran
    _group.cls = _XselGroup

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
