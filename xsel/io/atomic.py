"""Write files so that no reader ever sees a partial one: a temporary sibling, then one rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from xsel.io.outputs import writing


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` and rename the result to ``path``; the temporary goes away on failure.

    The temporary keeps the suffix (writers such as ``np.save`` and ``savefig`` choose the format by it)
    and carries the PID, so two processes writing the same file never share one. A full disk or a refused
    write is a one-line :class:`~xsel.errors.InputError` (:func:`xsel.io.outputs.writing`).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with writing(path):  # a full disk or a refused write: one line naming the file
            path.parent.mkdir(parents=True, exist_ok=True)
            write(temporary)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """A text file (JSON reports) through :func:`write_atomic`."""
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def replace_folder(temporary: Path, out: Path) -> None:
    """Move a finished folder into place in one rename; an old one is moved aside first and removed only once the
    new one is in place (bundles, label exports)."""
    if not out.exists():
        os.replace(temporary, out)
        return
    retired = out.absolute().with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, retired)
    os.replace(temporary, out)
    shutil.rmtree(retired, ignore_errors=True)
