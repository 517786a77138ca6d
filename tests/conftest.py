"""Rules that hold for every test: the missing-tool rule (:mod:`tests.support.tools`)."""

from __future__ import annotations

import pytest

from tests.support import tools


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or under CI fail) a test whose tools are missing, before any of its fixtures starts one."""
    tools.apply_marker(item)
