"""Development sessions: ``nox -s tests``, ``nox -s demo``, ``nox -s lint``."""

from __future__ import annotations

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
def lint(session: nox.Session) -> None:
    """Check style with ruff and types with mypy."""
    install(session, "dev")
    session.run("ruff", "check", "src", "tests", "examples")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Time efmap.explain against raw forward passes, Captum and a naive loop; rewrites docs/benchmarks.rst."""
    install(session, "test")
    session.run("python", "benchmarks/bench.py", *session.posargs)
