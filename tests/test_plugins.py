"""The plugin system: entry points, XSEL_LOAD_PLUGINS, registries, `xsel plugins`, and a throwaway plugin."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xsel import hookimpl, hookspecs, plugins
from xsel.errors import InputError, XselError

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
        cwd=cwd,
    )


class ThrowawayPlugin:
    """Registers one object of every kind, as a third-party plugin would."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        register("throwaway-encoder", lambda **_: None, aliases=("tae",), description="test only")

    @staticmethod
    @hookimpl
    def register_selectors(register):
        register("throwaway-selector", object, description="test only")

    @staticmethod
    @hookimpl
    def register_classifiers(register):
        register("throwaway-classifier", object, description="test only")


@pytest.fixture
def throwaway():
    plugins.register_plugin(ThrowawayPlugin, name="throwaway")
    try:
        yield
    finally:
        plugins.unregister_plugin("throwaway")


def test_every_hook_is_documented_and_exercised_by_the_throwaway_plugin():
    specs = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert sorted(specs) == sorted(plugins.HOOKS.values())
    for name in specs:
        assert getattr(hookspecs, name).__doc__, f"hook {name} needs a docstring"
        assert hasattr(ThrowawayPlugin, name), f"hook {name} is not exercised in tests"


def test_throwaway_plugin_registers_each_kind(throwaway, cli):
    rows = json.loads(cli("plugins", "--json").stdout)
    mine = {(r["kind"], r["name"]) for r in rows if r["plugin"] == "throwaway"}
    assert mine == {
        ("encoder", "throwaway-encoder"),
        ("selector", "throwaway-selector"),
        ("classifier", "throwaway-classifier"),
    }
    assert plugins.get("encoder", "tae").name == "throwaway-encoder"


def test_throwaway_plugin_is_gone_after_unregistering():
    """Registers and unregisters by itself, so it tests the same thing whatever ran before it."""
    plugins.register_plugin(ThrowawayPlugin, name="throwaway")
    try:
        assert "throwaway-encoder" in plugins.names("encoder")
    finally:
        plugins.unregister_plugin("throwaway")
    assert "throwaway-encoder" not in plugins.names("encoder")
    assert "throwaway" not in {row["plugin"] for row in plugins.list_plugins()}


def test_builtin_encoders_come_from_the_xsel_distribution():
    for name in ("resnet18", "resnet50", "densenet121", "pixels"):
        entry = plugins.get("encoder", name)
        assert (entry.distribution, entry.plugin) == ("xsel", "encoders")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown encoder 'resnet19'; choose one of: .*resnet18"):
        plugins.get("encoder", "resnet19")


def test_a_name_registered_twice_is_refused():
    class Clash:
        @staticmethod
        @hookimpl
        def register_encoders(register):
            register("pixels", object)

    plugins.register_plugin(Clash, name="clash")
    try:
        with pytest.raises(XselError, match="'pixels' is registered by both"):
            plugins.registry("encoder")
    finally:
        plugins.unregister_plugin("clash")


def test_plugins_json_lists_name_kind_plugin_distribution_version(cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {"name", "kind", "plugin", "distribution", "version"} <= set(rows[0])
    effnet = next(r for r in rows if r["name"] == "efficientnet-lite0")
    installed = importlib.metadata.version("xsel-efficientnet-lite")
    assert (effnet["kind"], effnet["distribution"]) == ("encoder", "xsel-efficientnet-lite")
    assert effnet["version"] == installed


def test_plugins_table_names_every_encoder(cli):
    result = cli("plugins")
    assert result.exit_code == 0
    for name in plugins.names("encoder"):
        assert name in result.stdout


@pytest.mark.parametrize(
    ("value", "has_example"), [("", False), ("efficientnet_lite", True), ("some_other_plugin", False)]
)
def test_xsel_load_plugins_narrows_third_party_plugins_only(value, has_example):
    result = run_python("from xsel import plugins; print(','.join(plugins.names('encoder')))", XSEL_LOAD_PLUGINS=value)
    names = result.stdout.strip().split(",")
    assert {"resnet18", "pixels"} <= set(names), result.stderr
    assert ("efficientnet-lite0" in names) is has_example


def _commands(group=None, prefix=()) -> list[list[str]]:
    """Every command of the CLI, sub-commands included, read from the app itself (a new one is covered too)."""
    import typer

    from xsel.cli import app

    group = group or typer.main.get_command(app)
    found = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            found += _commands(command, (*prefix, name))
        else:
            found.append([*prefix, name])
    return found


COMMANDS = _commands()


def test_the_command_list_is_complete():
    assert {"embed", "select", "evaluate", "export", "plugins", "demo", "explain"} <= {c[0] for c in COMMANDS}
    assert {("train", "selector"), ("train", "encoder"), ("train", "classifier")} <= {tuple(c) for c in COMMANDS}


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], *[[*c, "--help"] for c in COMMANDS]])
def test_cli_start_up_does_not_import_torch(args):
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom xsel.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\nassert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules)"
    )
    result = run_python(code)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_has_examples(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0 and "Examples" in result.stdout, result.output


def test_version_flag(cli):
    from xsel import __version__

    assert cli("--version").stdout.strip() == f"xsel {__version__}"


@pytest.mark.slow
def test_non_editable_install_ships_the_builtin_plugins(tmp_path):
    """The wheel maps plugins/ to `xsel_plugins` and declares the entry points; a plain install loads them."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("xsel-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "xsel_plugins/encoders.py" in names
    assert not any(n.startswith("plugins/") for n in names), "no top-level `plugins` package"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "encoders = xsel_plugins.encoders" in entry_points
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    code = (
        "import xsel_plugins, xsel\nfrom xsel import plugins\n"
        "print(xsel_plugins.__file__)\nprint(xsel.__file__)\nprint(plugins.get('encoder', 'pixels').plugin)"
    )
    result = run_python(code, cwd=tmp_path, PYTHONPATH=str(target), XSEL_LOAD_PLUGINS="")
    lines = result.stdout.split()
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(target)) for line in lines[:2]), lines
    assert lines[2] == "encoders"


SITE_PATH = ["site", "bundle", "selection", "selectors", "trust", "store", "identity", "labels", "geometry", "io"]


def test_the_site_path_cannot_reach_torch():
    """The torch boundary is the layout: no module a site runs imports torch or ``xsel.train``, even lazily."""
    import ast

    root = Path(__file__).resolve().parents[1] / "xsel"
    files = [
        path for name in SITE_PATH for path in ([root / f"{name}.py"] if name != "io" else (root / "io").glob("*.py"))
    ]
    assert len(files) >= len(SITE_PATH)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch", "torchvision", "xsel.train")), f"{path.name} imports {name}"


def test_workstation_modules_import_torch_at_the_top():
    """Inside ``xsel/train`` torch is imported at module level: the boundary is the folder, not a convention."""
    import ast

    for path in (Path(__file__).resolve().parents[1] / "xsel" / "train").glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        nested = [
            node.lineno
            for function in ast.walk(tree)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                (alias.name if isinstance(node, ast.Import) else node.module or "").startswith("torch")
                for alias in node.names
            )
        ]
        assert not nested, f"{path.name} imports torch inside functions at lines {nested}"
