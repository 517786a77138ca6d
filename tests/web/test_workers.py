"""The shipped worker class: connection counts shared by the workers, and new connections left to the less
loaded one."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from pathlib import Path

from attest_service.web.workers import MAX_DEFER_SECONDS, ConnectionCounts, Deferral
from tests.support.service import DocumentFactory, ServiceProcess, running_service


def test_counts_say_which_worker_holds_more_connections() -> None:
    counts = ConnectionCounts(slots=4)
    first, second = counts.claim(), counts.claim()
    assert (first, second) == (0, 1)
    counts.join(first, pid=101)
    assert not counts.busier_than_another(first)  # alone
    counts.join(second, pid=102)
    counts.add(first, 1)
    assert counts.busier_than_another(first)
    assert not counts.busier_than_another(second)
    counts.add(second, 1)
    assert not counts.busier_than_another(first)
    counts.add(second, -1)
    counts.leave(second)  # stopping: not counted, so nothing is left to it
    assert not counts.busier_than_another(first)


def test_a_released_slot_is_claimed_again_and_counts_nobody() -> None:
    counts = ConnectionCounts(slots=2)
    first, second = counts.claim(), counts.claim()
    assert counts.claim() is None  # all taken: that worker accepts as gunicorn's own does
    counts.join(first, pid=101)
    counts.join(second, pid=102)
    counts.add(first, 3)
    counts.release(second)  # the worker died without leaving
    assert not counts.busier_than_another(first)
    assert counts.claim() == second


def test_a_connection_is_left_to_others_for_a_bounded_time() -> None:
    counts = ConnectionCounts(slots=2)
    busy, idle = counts.claim(), counts.claim()
    counts.join(busy, pid=101)
    counts.join(idle, pid=102)
    counts.add(busy, 1)
    deferral = Deferral(counts, busy)
    assert deferral.leave_to_others(now=10.0)
    assert deferral.leave_to_others(now=10.0 + MAX_DEFER_SECONDS / 2)
    assert not deferral.leave_to_others(now=10.0 + MAX_DEFER_SECONDS * 1.01)  # nobody took it: taken here
    deferral.taken()
    assert deferral.leave_to_others(now=20.0)  # a new connection is left again
    counts.add(idle, 1)
    assert not deferral.leave_to_others(now=20.001)  # as loaded as the other: accepts


def access_lines(service: ServiceProcess, prefix: str) -> list[dict[str, object]]:
    """The access log lines of the requests whose id starts with ``prefix``."""
    return [line for line in (json.loads(text) for text in service.log_tail(characters=200_000).splitlines()
                              if text.startswith("{") and f'"{prefix}' in text)
            if str(line.get("request_id", "")).startswith(prefix)]


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
    assert max(workers.values()) - min(workers.values()) <= 2, workers
