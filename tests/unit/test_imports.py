"""Imports point one way: common imports neither master nor agent; master never imports torch or agent."""
from __future__ import annotations

import ast
import os

import pytest

from tests.conftest import ROOT


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path).read())
                modules = set()
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        modules |= {alias.name.split(".")[0] for alias in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        modules.add(node.module.split(".")[0])
                found[os.path.relpath(path, ROOT)] = modules
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [("common", {"master", "agent", "torch"}), ("master", {"agent", "torch"}), ("agent", {"master"})],
)
def test_imports_point_one_way(package, forbidden):
    offenders = {path: mods & forbidden for path, mods in imported_modules(package).items() if mods & forbidden}
    assert offenders == {}
