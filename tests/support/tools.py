"""The external tools the suite runs, and the one rule for a missing one.

redis-server, promtool, openssl, helm, node/npm and the atheris module are real components the tests drive.
On a developer's machine a missing tool skips the tests that need it, saying what is missing and how to get it;
under CI (``CI`` set to ``true``, ``1`` or ``yes``, any case) it fails them instead, so that a green CI run has
run every check. Every test that looks for a tool goes through this module:

* ``pytestmark = pytest.mark.requires_tool("redis-server", "redis-cli")`` on a module, class or test (the root
  ``conftest.py`` applies the rule before any fixture starts);
* :func:`require` / :func:`require_module` inside a fixture or a test, which return the path or the module;
* :func:`missing` where a tool is obtained some other way (helm from ``.ci/get-helm.sh``) and that failed.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass
from types import ModuleType
from typing import Final, NoReturn

import pytest

#: Values of ``CI`` that mean "this is a CI run" (GitHub Actions and GitLab set ``true``; others ``1``).
CI_VALUES: Final = frozenset({"true", "1", "yes"})
#: The marker that names the tools a test needs.
MARKER: Final = "requires_tool"


@dataclass(frozen=True, slots=True)
class Tool:
    """An executable the suite runs: the variable that may name its path, and how to install it."""

    name: str
    install: str
    env: str | None = None


#: Every executable the suite looks for. A tool missing from this table is a mistake in the test.
TOOLS: Final = {tool.name: tool for tool in (
    Tool("redis-server", "`make test` installs it (apt-get install redis-server)", "ATTEST_REDIS_SERVER"),
    Tool("redis-cli", "`make test` installs it (apt-get install redis-tools)", "ATTEST_REDIS_CLI"),
    Tool("promtool", "`make test` installs it (apt-get install prometheus)"),
    Tool("openssl", "apt-get install openssl"),
    Tool("helm", "tests/system/deploy fetches it with .ci/get-helm.sh, or set ATTEST_HELM", "ATTEST_HELM"),
    Tool("node", "apt-get install nodejs"),
    Tool("npm", "apt-get install npm"),
)}
#: Python modules the suite needs that may not install everywhere (atheris has no wheel for some platforms).
MODULES: Final = {"atheris": "pip install atheris (the test extra)"}


def under_ci() -> bool:
    """Whether this is a CI run, where every tool must be present."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def missing(reason: str) -> NoReturn:
    """Skip the current test because something it needs is missing, or fail it under CI; ``reason`` says what."""
    if under_ci():
        pytest.fail(f"{reason}; a CI run (CI={os.environ.get('CI')}) must have it", pytrace=False)
    pytest.skip(reason)


def find(name: str) -> str | None:
    """Path of the tool ``name``: its variable (``ATTEST_REDIS_SERVER``...) if set, else ``PATH``; None if absent."""
    tool = TOOLS[name]
    configured = os.environ.get(tool.env) if tool.env else None
    return configured or shutil.which(name)


def require(name: str, *others: str) -> str:
    """Path of the tool ``name`` (after checking ``others`` too); :func:`missing` when any of them is absent."""
    absent = [tool for tool in (name, *others) if find(tool) is None]
    if absent:
        missing("; ".join(f"{tool} is not installed: {TOOLS[tool].install}" for tool in absent))
    found = find(name)
    assert found is not None
    return found


def require_module(name: str) -> ModuleType:
    """The module ``name``, imported; :func:`missing` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"the Python module {name} is not installed ({error}): {MODULES[name]}")


def requires_tool(*names: str) -> pytest.MarkDecorator:
    """The marker for a test that needs ``names``; same as ``pytest.mark.requires_tool(*names)``."""
    unknown = [name for name in names if name not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}: add them to tests.support.tools.TOOLS")
    return pytest.mark.requires_tool(*names)


def apply_marker(item: pytest.Item) -> None:
    """Apply the rule to the tools ``item``'s ``requires_tool`` markers name (called before its fixtures)."""
    names = [name for marker in item.iter_markers(MARKER) for name in marker.args]
    if names:
        require(*names)


#: The marker of the tests that start Redis servers of their own.
requires_redis: Final = requires_tool("redis-server", "redis-cli")
