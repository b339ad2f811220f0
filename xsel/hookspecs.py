"""The plugin hooks. Each hook receives a ``register`` callback so one plugin can add many objects.

``register(name, factory, *, aliases=(), description="", weights=(), prefix=False, metavar="name")``:
``weights`` lists the named weight sets the factory knows (``xsel plugins`` shows them); ``prefix=True``
registers a name family, e.g. ``register("timm:", build, prefix=True, metavar="model")``: every name
``timm:<model>`` resolves to it and the factory is called as ``build("<model>", weights=..., **options)``.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("xsel")
hookimpl = HookimplMarker("xsel")


@hookspec
def register_encoders(register):
    """Register encoders: ``register(name, factory, *, aliases=(), description="", weights=(), prefix=False)``."""


@hookspec
def register_selectors(register):
    """Register selectors: ``register(name, factory, *, aliases=(), description="")``; a factory's keyword options
    (``checkpoint``, ``model``, …) are what ``--selector NAME=FILE`` and ``create_selector`` may pass. A learned
    selector exports with ``scorer()`` ((1, N, D′) → (1, N) scores) or, picking one image at a time, ``policy()``
    (TorchScript-compatible: (1, N, D′), K → (1, N) scores and (1, K) picks), and may carry ``trust_gate``
    (:class:`xsel.trust.TrustGate`), checked on every pool before it picks."""


@hookspec
def register_classifiers(register):
    """Register few-shot classifiers: ``register(name, factory, *, aliases=(), description="")``."""
