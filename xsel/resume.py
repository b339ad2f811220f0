"""Resuming an interrupted job (an embedding run, a training run): which settings it goes on with.

nanoGPT's habit: a resumed run takes its settings from its own checkpoint, so ``--resume`` needs only the run
folder. What the user asks for again is checked against what was saved: a setting that shapes the result
(the model, the data, the schedule) cannot change mid-run; the few that do not (a time budget, worker counts)
may.
"""

from __future__ import annotations

from pathlib import Path

from xsel.errors import InputError


def resumed_settings(
    saved: dict,
    requested: dict,
    *,
    where: str | Path,
    may_change: tuple[str, ...] = (),
    hint: str = "resume without them to go on as saved, or start a new run",
) -> dict:
    """The saved settings updated by ``requested`` (only what this invocation asks for); asking to change one
    that is not in ``may_change`` is an input error naming every such setting, then ``hint``."""
    changed = sorted(key for key, value in requested.items() if key not in may_change and saved.get(key) != value)
    if changed:
        allowed = f" (only {', '.join(option_name(key) for key in may_change)} may change)" if may_change else ""
        shown = ", ".join(f"{option_name(key)} {saved.get(key)!r} → {requested[key]!r}" for key in changed[:4])
        raise InputError(f"{where}: the interrupted run used other settings ({shown}){allowed}; {hint}")
    return {**saved, **requested}


def option_name(setting: str) -> str:
    """A setting as the user typed it: ``max_minutes`` → ``--max-minutes``."""
    return "--" + setting.replace("_", "-")
