"""Option types and parsing shared by several commands."""

from __future__ import annotations

from enum import Enum

import typer

from xsel.errors import InputError


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def split_list(value: str, option: str) -> list[str]:
    """A comma-separated option → its non-blank items; an empty list is an input error naming the option."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise InputError(f"{option} is empty; give a comma-separated list")
    return items


def typed_options(ctx: typer.Context) -> set[str]:
    """The parameters the user typed on the command line (not defaults): what a resumed run is asked to change."""
    # compared by name: typer ships its own copy of click's ParameterSource enum
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
