"""Rules that hold for every test: the missing-tool rule, no internet, and the fast tier's limits.

The fast tier (``make check``) is every test not marked ``slow``. It must start no process, open no server and
sleep for nothing, so that it stays a quick answer; that is enforced here, not remembered: while a fast test's
fixtures and body run, starting a process (``subprocess``, ``multiprocessing``, ``os.fork``...), binding or
listening on a socket, or sleeping fails the test, naming what it did and how to mark it. Mark such a test
``@pytest.mark.slow`` (or its module, ``pytestmark = pytest.mark.slow``; or its parameter, ``pytest.param(...,
marks=pytest.mark.slow)``): ``make test`` runs both tiers.
"""

from __future__ import annotations

import _posixsubprocess  # type: ignore[import-not-found]
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, Final

import pytest

from tests.support import tools

# Tests never reach the internet: the bundled China pins name a CA on DigiCert's servers, which a service
# fetches in the background by default. The tests of that fetch give their fetcher a loopback server.
os.environ.setdefault("ATTEST_FINGERPRINT_FETCH", "0")

#: pytester tries the rules themselves (tests/test_tiers.py).
pytest_plugins = ["pytester"]

#: The marker of the slow tier.
SLOW: Final = "slow"
#: Fixtures that start a process or a server (Redis servers, clusters and sentinels; the IMDS emulator, the CA
#: server, the service; helm; promtool): a test that uses one is in the slow tier without marking itself.
SERVER_FIXTURES: Final = frozenset({
    "redis", "standalone_redis", "shared_cluster", "server", "redis_store", "master", "sentinel", "sentinel_pair",
    "replica", "module_cluster", "cluster", "redis_pair", "lone_master", "sentinel_of_lone_master", "redis_for_live",
    "redis_url", "pair", "imds", "service", "listener", "bound", "port", "helm", "render", "promtool",
})


class FastTierViolation(Exception):
    """A test of the fast tier started a process, opened a server or slept."""


def _blocked() -> list[tuple[object, str, str]]:
    """What a fast test may not call: (owner, attribute, what calling it does)."""
    spawn = "starts a process"
    # Every subprocess.Popen (run, check_output...) goes through _execute_child, which holds its own reference
    # to fork_exec; multiprocessing's spawn calls _posixsubprocess.fork_exec; fork and the rest are the other
    # ways a process starts.
    targets: list[tuple[object, str, str]] = [(subprocess.Popen, "_execute_child", spawn),
                                              (_posixsubprocess, "fork_exec", spawn)]
    targets += [(os, name, spawn) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")
                if hasattr(os, name)]
    targets += [(socket.socket, "bind", "binds a socket (a server)"),
                (socket.socket, "listen", "listens on a socket (a server)"),
                (time, "sleep", "sleeps")]
    return targets


class _Guard:
    """Replaces the blocked calls for the duration of a fast test's phase and records what was attempted.

    The replacement raises in the caller, and the attempt is also recorded, so that a call made in another
    thread, or one whose exception the code under test swallows, still fails the test.
    """

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._lock = threading.Lock()

    def _wrap(self, original: Callable[..., Any], what: str, name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            if what == "sleeps" and args and args[0] == 0:
                return original(*args, **kwargs)  # sleep(0) yields the thread; it waits for nothing
            message = f"a fast-tier test {what} ({name}); mark it @pytest.mark.slow"
            with self._lock:
                self.violations.append(message)
            raise FastTierViolation(message)

        return refused

    @contextmanager
    def active(self) -> Iterator[None]:
        """Install the replacements, and restore the originals however the phase ends."""
        saved = []
        for owner, attribute, what in _blocked():
            original = getattr(owner, attribute)
            saved.append((owner, attribute, original))
            label = f"{getattr(owner, '__name__', owner)}.{attribute}"
            setattr(owner, attribute, self._wrap(original, what, label))
        try:
            yield
        finally:
            for owner, attribute, original in saved:
                setattr(owner, attribute, original)


def _guarded(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker(SLOW) is not None:
        return (yield)
    guard = _Guard()
    with guard.active():
        result = yield
    if guard.violations:
        raise FastTierViolation("; ".join(dict.fromkeys(guard.violations)))
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put a test that uses a fixture of :data:`SERVER_FIXTURES` in the slow tier."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker(SLOW) is None:
            item.add_marker(SLOW)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    """Apply the missing-tool rule before any fixture starts a tool; then set the fixtures up within the limits.

    A fast test's fixtures keep the fast tier's limits too, whatever their scope: a shared server started for
    a fast test is still a server.
    """
    tools.apply_marker(item)
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A fast test's body keeps the fast tier's limits."""
    return (yield from _guarded(item))
