"""Pytest plugin for collecting the docstring examples in ``src/efmap`` (run with ``--doctest-modules``).

It is loaded with ``-p doctest_collection`` rather than as a ``conftest.py`` in ``src/``, because a
second top-level ``conftest`` module beside ``tests/conftest.py`` makes pytest fail with "import file
mismatch".

Modules that import an optional dependency (matplotlib, Pillow, scikit-image, tqdm, ...)
must not break the run where that extra is not installed. A module is skipped
when any package it imports, at the top or inside a function, is not installed.
Its examples then run wherever the extra is installed.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from functools import cache
from pathlib import Path


@cache
def _missing_imports(path: Path) -> tuple[str, ...]:
    """Return the third-party packages that ``path`` imports and that are not installed."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    third_party = sorted(roots - set(sys.stdlib_module_names) - {"efmap", "__future__"})
    return tuple(name for name in third_party if importlib.util.find_spec(name) is None)


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Skip a module of the package whose optional dependencies are not installed."""
    if collection_path.suffix == ".py" and collection_path.name != "conftest.py":
        if _missing_imports(collection_path):
            return True
    return None
