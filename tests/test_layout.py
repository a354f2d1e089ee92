"""The layout is part of the design: dependencies point one way, nothing calls out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The parts of the fedpeft namespace and the folders they live in (pyproject's package-dir).
LAYERS = ("common", "server", "client")
# What each part may import of fedpeft. "fedpeft" stands for the operator modules in fedpeft/*.py
# (cli, deploy, runs, ...): they sit on top and may import anything, nothing imports them.
ALLOWED = {"common": {"common"}, "server": {"common", "server"}, "client": {"common", "client"}}


def imported(source: str, package: str) -> set[str]:
    """Every module a source file names, dotted in full: ``import a.b`` gives ``a.b``, ``from a
    import b`` gives ``a.b`` (``b`` may be a module: ``from fedpeft import server``), and a relative
    import is resolved against ``package``, the dotted package the file belongs to."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def part(module: str) -> str | None:
    """The part of fedpeft a module belongs to (a layer or "fedpeft"), None outside fedpeft.
    The bare package ``fedpeft`` holds only a version string and counts as no part: importing any
    fedpeft module imports it anyway."""
    names = module.split(".")
    if names[0] != "fedpeft" or len(names) == 1:
        return None
    return names[1] if names[1] in LAYERS else "fedpeft"


def forbidden(source: str, layer: str, package: str) -> set[str]:
    """The imports of a source file in ``layer`` that break the direction of dependencies."""
    return {m for m in imported(source, package) if part(m) not in {None, *ALLOWED[layer]}}


def _sources(folder: str) -> list[tuple[Path, str]]:
    """(file, dotted package) for every Python file under a top-level folder."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        inner = path.parent.relative_to(ROOT / folder).parts
        package = ".".join(("fedpeft", *([] if folder == "fedpeft" else [folder]), *inner))
        out.append((path, package))
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_dependencies_point_one_way(layer: str) -> None:
    sources = _sources(layer)
    assert sources
    bad = {
        f"{path.relative_to(ROOT)}: {module}"
        for path, package in sources
        for module in forbidden(path.read_text(), layer, package)
    }
    assert not bad, f"{layer}/ may import only fedpeft.{sorted(ALLOWED[layer])}: {sorted(bad)}"


@pytest.mark.parametrize(
    ("layer", "source", "caught"),
    [
        ("common", "import fedpeft.server.store", "fedpeft.server.store"),
        ("common", "from fedpeft.client.app import app", "fedpeft.client.app.app"),
        ("common", "from fedpeft import cli", "fedpeft.cli"),
        ("common", "from fedpeft.deploy import x", "fedpeft.deploy.x"),
        ("server", "from fedpeft import client", "fedpeft.client"),
        ("server", "def f():\n    from fedpeft import runs", "fedpeft.runs"),
        ("client", "from fedpeft import server", "fedpeft.server"),
        ("client", "import fedpeft.server.aggregation as agg", "fedpeft.server.aggregation"),
        ("client", "from .. import server", "fedpeft.server"),
        ("common", "from ..server.store import open_store", "fedpeft.server.store.open_store"),
    ],
)
def test_the_checker_catches_a_forbidden_import(layer: str, source: str, caught: str) -> None:
    # A checker that finds nothing would pass the test above on any code: show that it can fail.
    assert forbidden(source, layer, f"fedpeft.{layer}") == {caught}


@pytest.mark.parametrize(
    ("layer", "source"),
    [
        ("common", "import fedpeft\nfrom fedpeft import common\nfrom fedpeft.common import keys"),
        ("server", "from fedpeft.server.store import open_store\nimport numpy"),
        ("client", "from fedpeft.common.errors import DataError\nfrom . import trainer"),
    ],
)
def test_the_checker_lets_allowed_imports_through(layer: str, source: str) -> None:
    assert forbidden(source, layer, f"fedpeft.{layer}") == set()


def test_no_generic_top_level_imports() -> None:
    for folder in ("server", "client", "common", "fedpeft"):
        generic = {
            module
            for path, package in _sources(folder)
            for module in imported(path.read_text(), package)
            if module.split(".")[0] in LAYERS
        }
        assert not generic, f"{folder}/ imports {sorted(generic)}; use fedpeft.*"


def test_top_level_folders_exist() -> None:
    for name in ("server", "client", "common", "proto", "deploy", "tests", "fedpeft"):
        assert (ROOT / name).is_dir(), name
    assert (ROOT / "pyproject.toml").is_file()
