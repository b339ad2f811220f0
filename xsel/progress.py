"""Rich consoles and progress bars: diagnostics go to stderr so results on stdout can be piped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)


def notify(message: str, *, label: str = "note", style: str = "yellow") -> None:
    """One diagnostic line on stderr; the message is printed literally (brackets are not markup)."""
    stderr.print(f"[{style}]{label}:[/{style}] {escape(message)}", soft_wrap=True, highlight=False)


class _RateColumn(TextColumn):
    """Items per second over the whole run (steadier than rich's windowed speed)."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return f"{rate:,.1f} {self.unit}/s"


@contextmanager
def progress_bar(description: str, total: int, *, unit: str = "images", show: bool = True) -> Iterator[Callable]:
    """Yield ``advance(n, status="")``; draws a bar with count, rate, ETA and the latest status text (a
    training loss, say) on stderr when ``show`` is true."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=stderr,
        disable=not show,
    ) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({} if status is None else {"status": status}))

        yield advance
