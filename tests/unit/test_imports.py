"""Imports point one way: common imports neither master nor agent; master never imports torch or agent.
And our packages are imported as llmserve.*, the only name they have once installed."""
from __future__ import annotations

import ast
import os

import pytest

from tests.conftest import ROOT

OUR_PACKAGES = {"master", "agent", "common", "tools"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """Each file of `package` (a folder of the repository) -> the full names of the modules it imports."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            modules = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module)
            found[os.path.relpath(path, ROOT)] = modules
    return found


def our_package(module: str) -> str:
    """`master` for llmserve.master.engine; the top name (`torch`) for anything else."""
    parts = module.split(".")
    return parts[1] if parts[0] == "llmserve" and len(parts) > 1 else parts[0]


@pytest.mark.parametrize(
    "package, forbidden",
    [("common", {"master", "agent", "torch"}), ("master", {"agent", "torch"}), ("agent", {"master"})],
)
def test_imports_point_one_way(package, forbidden):
    offenders = {path: {our_package(m) for m in mods} & forbidden for path, mods in imported_modules(package).items()}
    assert {path: bad for path, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize("package", ["master", "agent", "common", "tools", "llmserve", "tests"])
def test_our_packages_are_imported_through_llmserve_only(package):
    bare = {path: {m.split(".")[0] for m in mods} & OUR_PACKAGES for path, mods in imported_modules(package).items()}
    assert {path: names for path, names in bare.items() if names} == {}
