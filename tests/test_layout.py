"""The layout is part of the design: dependencies point one way, nothing calls out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("server", ("fedpeft.client", "fedpeft.cli")),
        ("client", ("fedpeft.server", "fedpeft.cli")),
        ("common", ("fedpeft.server", "fedpeft.client", "fedpeft.cli")),
    ],
)
def test_dependencies_point_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    bad = {m for m in _imports(folder) if any(m == f or m.startswith(f + ".") for f in forbidden)}
    assert not bad, f"{folder}/ imports {sorted(bad)}"


def test_no_generic_top_level_imports() -> None:
    for folder in ("server", "client", "common", "fedpeft"):
        generic = {m for m in _imports(folder) if m.split(".")[0] in ("common", "server", "client")}
        assert not generic, f"{folder}/ imports {sorted(generic)}; use fedpeft.*"


def test_top_level_folders_exist() -> None:
    for name in ("server", "client", "common", "proto", "deploy", "tests", "fedpeft"):
        assert (ROOT / name).is_dir(), name
    assert (ROOT / "pyproject.toml").is_file()
