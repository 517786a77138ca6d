"""The shipped worker class: connection counts shared by the workers, and new connections left to the less
loaded one."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from attest_service.server.workers import MAX_DEFER_SECONDS, STALE_MS, ConnectionCounts, Deferral
from tests.support.service import DocumentFactory, ServiceProcess, running_service

#: An instant, in milliseconds of the monotonic clock.
NOW = 1_000_000


def test_counts_say_which_worker_holds_more_connections() -> None:
    counts = ConnectionCounts(slots=4)
    first, second = counts.claim(), counts.claim()
    assert (first, second) == (0, 1)
    counts.join(first, pid=101, now_ms=NOW)
    assert not counts.busier_than_another(first, NOW)  # alone
    counts.join(second, pid=102, now_ms=NOW)
    counts.add(first, 1)
    assert counts.busier_than_another(first, NOW)
    assert not counts.busier_than_another(second, NOW)
    counts.add(second, 1)
    assert not counts.busier_than_another(first, NOW)
    counts.add(second, -1)
    counts.leave(second)  # stopping: not counted, so nothing is left to it
    assert not counts.busier_than_another(first, NOW)


def test_a_released_slot_is_claimed_again_and_counts_nobody() -> None:
    counts = ConnectionCounts(slots=2)
    first, second = counts.claim(), counts.claim()
    assert counts.claim() is None  # all taken: that worker accepts as gunicorn's own does
    counts.join(first, pid=101, now_ms=NOW)
    counts.join(second, pid=102, now_ms=NOW)
    counts.add(first, 3)
    counts.release(second)  # the worker died without leaving
    assert not counts.busier_than_another(first, NOW)
    assert counts.claim() == second


def two_workers(busy_connections: int) -> tuple[ConnectionCounts, int, int]:
    """Counts of two running workers, the first (``busy``) holding ``busy_connections``, the other none."""
    counts = ConnectionCounts(slots=2)
    busy, other = counts.claim(), counts.claim()
    assert busy is not None
    assert other is not None
    counts.join(busy, pid=101, now_ms=NOW)
    counts.join(other, pid=102, now_ms=NOW)
    counts.add(busy, busy_connections)
    return counts, busy, other


def test_a_worker_whose_loop_stopped_running_is_left_nothing() -> None:
    counts, busy, stuck = two_workers(busy_connections=5)
    assert counts.busier_than_another(busy, NOW + STALE_MS - 1)
    assert not counts.busier_than_another(busy, NOW + STALE_MS)  # silent for too long: a blocked loop
    counts.beat(stuck, NOW + STALE_MS)
    assert counts.busier_than_another(busy, NOW + STALE_MS + 1)


def test_a_connection_is_left_to_others_for_a_bounded_time() -> None:
    counts, busy, idle = two_workers(busy_connections=1)
    deferral = Deferral(counts, busy)
    assert deferral.leave_to_others(now=NOW / 1000)
    assert deferral.leave_to_others(now=NOW / 1000 + MAX_DEFER_SECONDS / 2)
    assert not deferral.leave_to_others(now=NOW / 1000 + MAX_DEFER_SECONDS * 1.01)  # nobody took it: taken here
    deferral.taken()
    assert deferral.leave_to_others(now=NOW / 1000 + 0.05)  # a new connection is left again
    counts.add(idle, 1)
    assert not deferral.leave_to_others(now=NOW / 1000 + 0.051)  # as loaded as the other: accepts


def access_lines(service: ServiceProcess, prefix: str) -> list[dict[str, object]]:
    """The access log lines of the requests whose id starts with ``prefix``."""
    return [line for line in (json.loads(text) for text in service.log_tail(characters=200_000).splitlines()
                              if text.startswith("{") and f'"{prefix}' in text)
            if line.get("logger") == "gunicorn.access" and str(line.get("request_id", "")).startswith(prefix)]


def wait_for_both_workers(service: ServiceProcess) -> None:
    # The service answers once one worker does; the other may still be loading the application.
    deadline = time.monotonic() + 30
    while len({line["pid"] for line in access_lines(service, "ready-")}) < 2:
        assert time.monotonic() < deadline, "the second worker never answered"
        for index in range(4):  # new connections, which either worker may take
            connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
            connection.request("GET", "/healthz", headers={"X-Request-Id": f"ready-{index}"})
            connection.getresponse().read()
            connection.close()
        time.sleep(0.1)


#: Of the 24 connections, the fewest one of two workers may hold (two thirds of its even share of 12).
FLOOR = 8


@pytest.mark.slow
def test_connections_opened_one_after_another_are_shared_evenly(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}"}
    with running_service(env, tmp_path, workers=2) as service:
        wait_for_both_workers(service)
        connections = []
        try:
            for index in range(24):
                connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
                connection.request("GET", "/healthz", headers={"X-Request-Id": f"spread-{index}"})
                assert connection.getresponse().read()
                connections.append(connection)  # kept open: it stays with its worker
        finally:
            for connection in connections:
                connection.close()
        lines = access_lines(service, "spread-")
        deadline = time.monotonic() + 10
        while len(lines) < 24 and time.monotonic() < deadline:  # a line is written after its answer
            time.sleep(0.05)
            lines = access_lines(service, "spread-")
    workers = Counter(line["pid"] for line in lines)
    assert len(lines) == 24
    assert len(workers) == 2, workers
    # A floor, not an exact split: a busy machine may delay a worker's turn now and then (16/8 passes), but a
    # worker that leaves new connections to the other, or takes them all, fails (24/0, 20/4).
    assert min(workers.values()) >= FLOOR, workers
