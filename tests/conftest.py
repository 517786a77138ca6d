"""Rules that hold for every test: the missing-tool rule (:mod:`tests.support.tools`), and no internet."""

from __future__ import annotations

import os

import pytest

from tests.support import tools

# Tests never reach the internet: the bundled China pins name a CA on DigiCert's servers, which a service
# fetches in the background by default. The tests of that fetch give their fetcher a loopback server.
os.environ.setdefault("ATTEST_FINGERPRINT_FETCH", "0")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or under CI fail) a test whose tools are missing, before any of its fixtures starts one."""
    tools.apply_marker(item)
