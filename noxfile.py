"""Test sessions. ``nox -s tests`` is CI's run (pinned by constraints.txt); ``nox -s latest``
installs the newest releases of every dependency instead, to see drift before it breaks CI
(docs/CONTRIBUTING.md, "Tests"; no result of it is recorded there yet).

    pip install nox && nox -s latest
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """What .ci/run does: the versions last known green."""
    session.install("-e", ".[test,rtx]", "-c", "constraints.txt")
    session.run("python", "-m", "pytest", "-q", "-n", "2", *session.posargs)


@nox.session(python="3.11")
def latest(session: nox.Session) -> None:
    """The newest release of everything (torch left unpinned, as always: an exact pin can pick a
    local +cpu wheel that torchvision cannot load)."""
    session.install("--upgrade", "-e", ".[test,rtx]")
    session.run("python", "-m", "pip", "list", "--format=freeze")
    session.run("python", "-m", "pytest", "-q", "-n", "2", *session.posargs)
