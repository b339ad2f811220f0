"""The plugin manager and the registries of encoders, selectors and classifiers built from its hooks.

Built-in plugins (distribution ``xsel``) and third-party ones load through the same ``xsel``
entry-point group. ``XSEL_LOAD_PLUGINS`` (comma list of entry-point names; empty = none) narrows
which third-party plugins load; built-ins always load.

A plugin registers fixed names, or a name *family* with ``prefix=True`` (``register("timm:", factory,
prefix=True, metavar="model")``): any longer name that starts with the prefix resolves to the family, and its
factory receives the rest of the name as its first argument. Exact names win over a family; among families
the longest matching prefix wins.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import pluggy

from xsel import hookspecs
from xsel.errors import InputError, XselError

ENTRY_POINT_GROUP = "xsel"
HOOKS = {
    "encoder": "register_encoders",
    "selector": "register_selectors",
    "classifier": "register_classifiers",
}

pm = pluggy.PluginManager("xsel")
pm.add_hookspecs(hookspecs)


@dataclass(frozen=True)
class Registration:
    """One object a plugin registered: its name, kind, factory and where it came from.

    ``weights`` names the weight sets the factory knows (shown by ``xsel plugins``). A family has ``prefix``
    set (``"timm:"``) and is named ``prefix<metavar>`` (``"timm:<model>"``).
    """

    name: str
    kind: str
    factory: Callable
    aliases: tuple[str, ...]
    description: str
    plugin: str
    distribution: str
    version: str
    weights: tuple[str, ...] = ()
    prefix: str | None = None


_distributions: dict[str, tuple[str, str]] = {}
_registries: dict[str, dict[str, Registration]] = {}
_families: dict[str, dict[str, Registration]] = {}
_loaded = False


def _allowed_third_party() -> set[str] | None:
    value = os.environ.get("XSEL_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def load_plugins() -> None:
    """Load every allowed entry point of group ``xsel`` once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    allowed = _allowed_third_party()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        dist_name, version = (dist.name, dist.version) if dist is not None else ("unknown", "unknown")
        builtin = dist_name == "xsel"
        if not builtin and allowed is not None and entry_point.name not in allowed:
            continue
        if pm.has_plugin(entry_point.name):
            continue  # the same distribution seen twice on sys.path
        try:
            module = entry_point.load()
        except Exception as error:
            raise XselError(
                f"plugin {entry_point.name!r} ({dist_name} {version}) failed to load: {error}; "
                "fix or uninstall it, or leave it out of XSEL_LOAD_PLUGINS"
            ) from error
        pm.register(module, name=entry_point.name)
        _distributions[entry_point.name] = (dist_name, version)


def _collect(kind: str) -> tuple[dict[str, Registration], dict[str, Registration]]:
    load_plugins()
    registry: dict[str, Registration] = {}
    families: dict[str, Registration] = {}
    hook = getattr(pm.hook, HOOKS[kind])
    for impl in reversed(hook.get_hookimpls()):  # registration order: first registered first
        plugin = pm.get_name(impl.plugin)
        dist_name, version = _distributions.get(plugin, ("unknown", "unknown"))

        def register(
            name,
            factory,
            *,
            aliases=(),
            description="",
            weights=(),
            prefix=False,
            metavar="name",
            _plugin=plugin,
            _d=dist_name,
            _v=version,
        ):
            if prefix and (aliases or not name):
                raise XselError(f"plugin {_plugin!r}: a {kind} family needs a non-empty prefix and takes no aliases")
            taken = families if prefix else registry
            for key in (name, *aliases):
                if key in taken:
                    raise XselError(
                        f"{kind} name {key!r} is registered by both {taken[key].plugin!r} and "
                        f"{_plugin!r}; narrow the plugins with XSEL_LOAD_PLUGINS"
                    )
            shown, family_prefix = (f"{name}<{metavar}>", name) if prefix else (name, None)
            entry = Registration(
                shown, kind, factory, tuple(aliases), description, _plugin, _d, _v, tuple(weights), family_prefix
            )
            for key in (name, *aliases):
                taken[key] = entry

        # by name, as pluggy would: an implementation may leave out arguments a later spec adds
        impl.function(**({"register": register} if "register" in impl.argnames else {}))
    return registry, families


def _load(kind: str) -> None:
    if kind not in _registries:
        _registries[kind], _families[kind] = _collect(kind)


def registry(kind: str) -> dict[str, Registration]:
    """Name (and alias) → registration for one kind: ``encoder``, ``selector`` or ``classifier`` (no families)."""
    _load(kind)
    return _registries[kind]


def families(kind: str) -> dict[str, Registration]:
    """Prefix → registration of the name families of one kind (``{"timm:": ...}``)."""
    _load(kind)
    return _families[kind]


def names(kind: str) -> list[str]:
    """Primary names of one kind, sorted."""
    return sorted({entry.name for entry in registry(kind).values()})


def get(kind: str, name: str) -> Registration:
    """Look a name, alias or family member up; an unknown name raises an :class:`InputError` listing the valid ones.

    A family member comes back named in full (``timm:resnet18``: the encoder identity), its factory with the rest
    of the name (``resnet18``) bound as the first argument.
    """
    entries = registry(kind)
    if name in entries:
        return entries[name]
    matches = [prefix for prefix in families(kind) if name.startswith(prefix) and len(name) > len(prefix)]
    if matches:
        family = families(kind)[max(matches, key=len)]
        return replace(family, name=name, factory=partial(family.factory, name[len(family.prefix) :]))
    valid = names(kind) + sorted(entry.name for entry in families(kind).values())
    raise InputError(f"unknown {kind} {name!r}; choose one of: {', '.join(valid) or 'none installed'}")


def list_plugins() -> list[dict]:
    """Every registered object as ``{name, kind, plugin, distribution, version, aliases, description, weights,
    prefix}``; a family is one row named ``prefix<metavar>`` (``timm:<model>``) with ``prefix`` set."""
    rows = []
    for kind in HOOKS:
        entries = {e.name: e for e in [*registry(kind).values(), *families(kind).values()]}
        for entry in sorted(entries.values(), key=lambda e: e.name):
            rows.append(
                {
                    "name": entry.name,
                    "kind": kind,
                    "plugin": entry.plugin,
                    "distribution": entry.distribution,
                    "version": entry.version,
                    "aliases": list(entry.aliases),
                    "description": entry.description,
                    "weights": list(entry.weights),
                    "prefix": entry.prefix,
                }
            )
    return rows


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object directly (a notebook or a test), without packaging it."""
    load_plugins()
    pm.register(plugin, name=name)
    _distributions[name] = ("(registered in process)", "")
    _registries.clear()


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    pm.unregister(name=name)
    _distributions.pop(name, None)
    _registries.clear()
