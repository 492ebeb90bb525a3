"""Sphinx configuration of the efmap documentation.

Build it with ``nox -s docs``, or directly::

    sphinx-build -W -b html docs docs/_build/html

The build is meant to work offline and with warnings as errors:

* Intersphinx reads inventories only from local files: put ``python.inv``,
  ``numpy.inv`` or ``torch.inv`` (the ``objects.inv`` of those projects) in
  ``docs/_intersphinx/``, or set ``EFMAP_DOCS_INTERSPHINX=online`` on a machine
  with network access to fetch them. On Debian, ``apt-get install python3.11-doc``
  provides Python's at ``/usr/share/doc/python3.11/html/objects.inv``. Without
  inventories, references to those projects render as plain text, and
  ``nitpick_ignore_regex`` keeps them from failing the nitpicky build.
* Formulas are typeset in the browser by MathJax. The ``docs`` extra installs
  ``sphinx-mathjax-offline``, which copies MathJax 3 into the site, so the
  pages render formulas without network. Without that package the pages load
  MathJax from its public CDN.
* sphinx-gallery runs only the examples named ``plot_*.py`` (each runs in
  seconds on a CPU); the other scripts in ``examples/`` are shown without
  being run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Document the working tree, not whatever efmap happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

import efmap  # noqa: E402

project = "efmap"
author = "efmap developers"
copyright = "efmap developers"  # noqa: A001
release = efmap.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    # After napoleon, so that it adds the types to the converted parameter lists.
    "sphinx_autodoc_typehints",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
]
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    # The package's import name contains hyphens. It ships MathJax and points mathjax_path at the copy.
    extensions.append("sphinx-mathjax-offline")

templates_path = ["_templates"]
exclude_patterns = ["_build", "_intersphinx"]
nitpicky = True

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"efmap {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# -- autodoc, autosummary, napoleon, type hints -------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"  # sphinx_autodoc_typehints writes the types into the descriptions
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = True
napoleon_use_ivar = False  # attributes become targets that :attr: can link to
napoleon_custom_sections = [("Warns", "params_style")]
typehints_fully_qualified = False
always_document_param_types = True
typehints_defaults = "comma"
typehints_document_rtype = True
typehints_use_rtype = False

# -- doctest (the code on the getting-started page) ---------------------------------------------
doctest_global_setup = "import torch\ntorch.manual_seed(0)"
doctest_test_doctest_blocks = "default"

# -- math and plots -----------------------------------------------------------------------------
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.figsize": (6.0, 3.2)}

# -- sphinx-gallery -----------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # Run only the fast examples; the others (full training runs, benchmarks) are shown unrun.
    "filename_pattern": r"[\\/]plot_",
    "ignore_pattern": r"[\\/]_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "ExampleTitleSortKey",
    "min_reported_time": 1,
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib",),
    "show_memory": False,
}

# -- intersphinx: local inventories only, unless asked to fetch -----------------------------------
INVENTORIES = {
    "python": "https://docs.python.org/3",
    "numpy": "https://numpy.org/doc/stable",
    "torch": "https://docs.pytorch.org/docs/stable",
}
intersphinx_mapping: dict[str, tuple[str, Any]] = {}
for _name, _url in INVENTORIES.items():
    _local = HERE / "_intersphinx" / f"{_name}.inv"
    if os.environ.get("EFMAP_DOCS_INTERSPHINX") == "online":
        intersphinx_mapping[_name] = (_url, None)
    elif _local.is_file():
        intersphinx_mapping[_name] = (_url, str(_local))
intersphinx_timeout = 10

# References into projects without a local inventory cannot resolve, so they render as plain text.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|matplotlib|PIL|skimage|collections\.abc|typing|typing_extensions|pathlib|os)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|ndarray|Generator|Callable|Sequence|Iterator|Mapping|Any|Literal|Union)"),
    (r"py:.*", r"(dtype|device|memory_format)"),
    # Generic builtins written in a Returns section, such as list[float].
    (r"py:class", r"(list|tuple|dict|set)\[.*\]"),
]
# The ``...`` of tuple[int, ...] in type hints has no target in any inventory.
nitpick_ignore = [("py:data", "Ellipsis")]

linkcheck_ignore = [r"https?://.*"]  # offline: only links inside the site are checked


# -- Completeness check: every public name appears in the API reference ---------------------------
PUBLIC_MODULES = ("efmap", "efmap.evaluate", "efmap.reference")


def _public_modules() -> list[str]:
    """List efmap and every submodule whose name has no leading underscore."""
    import pkgutil

    names = []
    for info in pkgutil.walk_packages(efmap.__path__, prefix="efmap."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return [*PUBLIC_MODULES, *sorted(set(names) - set(PUBLIC_MODULES))]


def _check_public_names(app: Any, env: Any) -> None:
    """Warn (an error under -W) about any public name that the API reference does not document."""
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    documented = set(env.get_domain("py").objects)
    for module_name in _public_modules():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # an optional dependency of the docs is missing
            log.warning("failed to import %s to check the API reference: %s", module_name, error)
            continue
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            where = f"{module_name}.{name}"
            if inspect.isclass(obj) or inspect.isfunction(obj):
                where = f"{obj.__module__}.{obj.__qualname__}"
            if where not in documented and f"{module_name}.{name}" not in documented:
                log.warning("public name %s.%s is missing from the API reference (docs/api.rst)", module_name, name)


def _resolve_reexports(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve ``efmap.X`` and ``efmap._private.X`` to where ``X`` is documented.

    Type hints name an object by the module that defines it, and docstrings by
    its public path; both should land on its one documented entry.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    short = target.rsplit(".", 1)[-1]
    for module_name in PUBLIC_MODULES:
        module = sys.modules.get(module_name)
        if module is None or short not in getattr(module, "__all__", ()):
            continue
        if target not in (short, f"{module_name}.{short}") and "._" not in target:
            continue
        obj = getattr(module, short)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            canonical = f"{obj.__module__}.{obj.__qualname__}"
            if "._" in canonical:
                canonical = f"{module_name}.{short}"
            domain = env.get_domain("py")
            if canonical in domain.objects:
                return domain.resolve_xref(
                    env, node.get("refdoc"), app.builder, node.get("reftype"), canonical, node, contnode
                )
    return None


def setup(app: Any) -> None:
    """Connect the API completeness check and the re-export resolver."""
    app.connect("env-check-consistency", _check_public_names)
    app.connect("missing-reference", _resolve_reexports)
