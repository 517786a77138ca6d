"""The fast tier's limits hold: a fast test that starts a process, opens a server or sleeps fails.

The guard of ``tests/conftest.py`` is tried directly (in the fast tier itself), then through a whole pytest run
of small test files, where a slow mark, a server fixture or a fixture parameter's mark lifts it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SLOW, FastTierViolation, _Guard

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_starting_a_process_is_refused_and_recorded() -> None:
    guard = _Guard()
    with guard.active(), pytest.raises(FastTierViolation, match="starts a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    assert guard.violations


def test_multiprocessing_is_refused() -> None:
    guard = _Guard()
    process = multiprocessing.get_context("fork").Process(target=print)
    with guard.active(), pytest.raises(FastTierViolation, match="starts a process"):
        process.start()
    assert guard.violations


@pytest.mark.parametrize("call", [lambda sock: sock.bind(("127.0.0.1", 0)), lambda sock: sock.listen()])
def test_binding_or_listening_is_refused(call: object) -> None:
    guard = _Guard()
    with socket.socket() as sock, guard.active(), pytest.raises(FastTierViolation, match="socket"):
        call(sock)  # type: ignore[operator]
    assert guard.violations


def test_a_sleep_in_another_thread_is_recorded_though_its_exception_is_lost() -> None:
    guard = _Guard()

    def swallowing() -> None:
        with contextlib.suppress(FastTierViolation):
            time.sleep(0.001)

    with guard.active():
        thread = threading.Thread(target=swallowing)
        thread.start()
        thread.join()
    assert guard.violations == ["a fast-tier test sleeps (time.sleep); mark it @pytest.mark.slow"]


def test_sleep_zero_and_the_originals_after_the_phase_are_allowed() -> None:
    original = time.sleep
    guard = _Guard()
    with guard.active():
        assert time.sleep is not original
        time.sleep(0)
    assert time.sleep is original
    assert socket.socket.bind is not None
    assert guard.violations == []


_TESTS = f'''
import subprocess, sys, time
import pytest

@pytest.fixture
def server():
    yield "a server fixture lifts the limits"

def test_fast_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=False)

def test_fast_swallows_its_sleep():
    try:
        time.sleep(0.001)
    except Exception:
        pass

def test_fast_is_fine():
    assert True

@pytest.mark.{SLOW}
def test_slow_may_start_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_with_a_server_fixture_may_sleep(server):
    time.sleep(0.001)

@pytest.fixture(params=["plain", pytest.param("marked", marks=pytest.mark.{SLOW})])
def backend(request):
    if request.param == "marked":
        time.sleep(0.001)
    return request.param

def test_a_marked_parameter_may_sleep_in_its_fixture(backend):
    assert backend
'''


@pytest.mark.slow
def test_a_pytest_run_fails_exactly_the_fast_tests_that_break_the_limits(pytester: pytest.Pytester) -> None:
    # The run happens in this process; this test is slow so that its own guard does not see the inner tests.
    pytester.makeconftest((REPO_ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_inner=_TESTS)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n    requires_tool: tools\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    outcomes = {report.nodeid.split("::")[-1]: report.outcome
                for report in result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
                if report.when == "call" or report.outcome != "passed"}
    assert outcomes == {
        "test_fast_starts_a_process": "failed",
        "test_fast_swallows_its_sleep": "failed",
        "test_fast_is_fine": "passed",
        "test_slow_may_start_a_process": "passed",
        "test_with_a_server_fixture_may_sleep": "passed",
        "test_a_marked_parameter_may_sleep_in_its_fixture[plain]": "passed",
        "test_a_marked_parameter_may_sleep_in_its_fixture[marked]": "passed",
    }
    assert "mark it @pytest.mark.slow" in result.stdout.str()
