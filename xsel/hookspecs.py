"""The plugin hooks. Each hook receives a ``register`` callback so one plugin can add many objects."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("xsel")
hookimpl = HookimplMarker("xsel")


@hookspec
def register_encoders(register):
    """Register encoders: ``register(name, factory, *, aliases=(), description="")``."""


@hookspec
def register_selectors(register):
    """Register selectors: ``register(name, factory, *, aliases=(), description="")``."""


@hookspec
def register_classifiers(register):
    """Register few-shot classifiers: ``register(name, factory, *, aliases=(), description="")``."""
