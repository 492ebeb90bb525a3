"""Checks behind the documentation: docstring examples exist, and the site's link checker finds broken links."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

import efmap

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public_functions() -> list[tuple[str, object]]:
    modules = ["efmap"] + [
        info.name
        for info in pkgutil.walk_packages(efmap.__path__, prefix="efmap.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    found = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module of an optional extra that is not installed
            continue
        for attribute in getattr(module, "__all__", ()):
            obj = getattr(module, attribute)
            if inspect.isfunction(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(found.items())


@pytest.mark.parametrize(("name", "function"), _public_functions(), ids=lambda value: str(value))
def test_public_function_has_runnable_example(name: str, function: object) -> None:
    """Every public function documents an Examples section with at least one doctest line."""
    doc = inspect.getdoc(function) or ""
    assert "Examples\n--------" in doc, f"{name} has no Examples section"
    examples = doc.split("Examples\n--------", 1)[1]
    assert ">>> " in examples, f"{name} has an Examples section without a doctest"


def _write_site(root: Path, index: str, page: str) -> None:
    root.mkdir()
    (root / "index.html").write_text(f"<html><body>{index}</body></html>", encoding="utf-8")
    (root / "page.html").write_text(f"<html><body>{page}</body></html>", encoding="utf-8")


def test_check_links_accepts_a_consistent_site(tmp_path: Path) -> None:
    checker = _load(ROOT / "docs" / "check_links.py", "check_links")
    _write_site(
        tmp_path / "site",
        '<a href="page.html#part">a</a><a href="#top">b</a><p id="top"></p><a href="https://example.org/">c</a>',
        '<h2 id="part">Part</h2><a href="index.html">back</a>',
    )
    broken, checked, external = checker.check_site(tmp_path / "site")
    assert (broken, checked, external) == ([], 3, 1)


def test_check_links_reports_missing_files_and_anchors(tmp_path: Path) -> None:
    checker = _load(ROOT / "docs" / "check_links.py", "check_links")
    _write_site(
        tmp_path / "site",
        '<a href="page.html#nowhere">a</a><img src="_images/missing.png">',
        "<p>no anchors</p>",
    )
    broken, checked, _ = checker.check_site(tmp_path / "site")
    assert checked == 2
    assert any("no anchor #nowhere" in line for line in broken)
    assert any("no file _images/missing.png" in line for line in broken)
    assert checker.main(["check_links.py", str(tmp_path / "site")]) == 1


def test_check_links_rejects_a_missing_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checker = _load(ROOT / "docs" / "check_links.py", "check_links")
    assert checker.main(["check_links.py", str(tmp_path)]) == 2
    assert "Expected a built HTML site" in capsys.readouterr().out


def test_doctest_collection_skips_modules_with_missing_optional_imports(tmp_path: Path) -> None:
    collection = _load(ROOT / "tests" / "doctest_collection.py", "efmap_doctest_collection")
    lazy = tmp_path / "lazy.py"
    lazy.write_text("import os\n\ndef f():\n    import not_an_installed_package_x.sub\n", encoding="utf-8")
    present = tmp_path / "present.py"
    present.write_text("import json\nfrom torch import nn\nfrom . import sibling\n", encoding="utf-8")
    assert collection._missing_imports(lazy) == ("not_an_installed_package_x",)
    assert collection._missing_imports(present) == ()
    assert collection.pytest_ignore_collect(lazy) is True
    assert collection.pytest_ignore_collect(present) is None
    assert "efmap_doctest_collection" not in sys.modules
