"""The code keeps its own rules: ruff (lint and format), strict mypy and the layers contract
(import-linter, `[tool.importlinter]` in pyproject.toml) pass on the tree."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],  # strict, over the packages named in pyproject.toml
        ["lint-imports"],  # the layers
    ],
    ids=["ruff-check", "ruff-format", "mypy", "lint-imports"],
)
def test_the_tree_passes(command: list[str]) -> None:
    if command[0] == "lint-imports":  # a console script only (no `python -m` entry point)
        argv = [str(Path(sys.executable).parent / "lint-imports")]
    else:
        argv = [sys.executable, "-m", *command]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


PACKAGES = ["controlplane", "stripe_emulator"]  # plugins/, flags/, migrations/ through links


def _modules(*folders: str) -> list[Path]:
    """The Python files under `folders`, through the links to plugins/, flags/, migrations/."""
    found: set[Path] = set()
    for folder in folders:
        for where, _, files in os.walk(ROOT / folder, followlinks=True):
            found |= {(Path(where) / f).resolve() for f in files if f.endswith(".py")}
    return sorted(found)


def test_no_shell_touches_storage() -> None:
    """The HTTP and CLI shells call the core (`cp.ledger(...)`), never `cp.storage`."""
    touching = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _modules("controlplane/http", "controlplane/cli")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "storage"
    ]
    assert not touching, f"shell code reaching into storage: {touching}"


MAX_LINES = 800  # a module past it does several things: split it by what it does


def test_no_module_is_past_the_size_where_it_does_several_things() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in _modules(*PACKAGES)}
    large = [f"{path.relative_to(ROOT)}: {n}" for path, n in sizes.items() if n > MAX_LINES]
    assert large == [], large
