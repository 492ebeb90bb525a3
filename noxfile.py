"""Development sessions: ``nox -s tests``, ``nox -s demo``, ``nox -s lint``, ``nox -s docs``."""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build must be installed before the project: an open range would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite, doctests included."""
    install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Train, explain and evaluate on the faces that scikit-image ships (examples/quickstart.py)."""
    install(session, "examples")
    session.run("python", "examples/quickstart.py", "--out", "out/quickstart", *session.posargs)


@nox.session
def evaluate(session: nox.Session) -> None:
    """Evaluate maps and landmarks on the scikit-image faces (examples/evaluate_quickstart.py)."""
    install(session, "examples,compare")
    session.run("python", "examples/evaluate_quickstart.py", "--out", "out/evaluate", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style with ruff and types with mypy."""
    install(session, "dev")
    session.run("ruff", "check", "src", "tests", "examples")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors, run its doctests and check the links inside the site."""
    install(session, "docs")
    # Start clean, as a fresh clone would: stale gallery pages of removed examples fail the -W build.
    for generated in ("docs/_build", "docs/auto_examples", "docs/generated"):
        shutil.rmtree(generated, ignore_errors=True)
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs)
    # The doctest builder runs the code on the guide pages; the gallery already ran in the html build.
    doctest = ["-b", "doctest", "-D", "plot_gallery=0", "docs", "docs/_build/doctest"]
    session.run("sphinx-build", "-W", "--keep-going", *doctest)
    session.run("python", "docs/check_links.py", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Time efmap.explain against raw forward passes, Captum and a naive loop; rewrites docs/benchmarks.rst."""
    install(session, "test")
    session.run("python", "benchmarks/bench.py", *session.posargs)
