"""The benchmarks' open-loop client (benchmarks/openloop.py) measures what it says it measures.

Its latency figures are the half-capacity and under-load figures of ``make bench``, so it is tested like
the product: real sockets, a real HTTP server in a thread, answers that stall or close, a port that refuses.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The benchmarks are scripts, not a package: their directory goes on the path, as when they run.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from openloop import percentile, post_request, run_paced

# The client is tried against loopback HTTP servers of its own.
pytestmark = pytest.mark.slow

#: Milliseconds the stalling server holds one answer.
STALL_MS = 300.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # http.server writes the head and the body apart; with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the head (40 ms). gunicorn sets TCP_NODELAY too.
    disable_nagle_algorithm = True
    stall_first = False
    stall_all = False
    close_each = False
    stalled = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.stall_all or (self.stall_first and not self.stalled.is_set()):
            self.stalled.set()
            time.sleep(STALL_MS / 1000)
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_each:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def _serve(**behaviour: bool) -> Iterator[int]:
    handler = type("Handler", (_Handler,), {**behaviour, "stalled": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def port() -> Iterator[int]:
    yield from _serve()


def _requests(port: int, count: int) -> list[bytes]:
    return [post_request("127.0.0.1", port, "/v1/verify", b'{"n":%d}' % index) for index in range(count)]


def test_every_request_is_answered_over_the_kept_alive_connections(port: int) -> None:
    result = run_paced("127.0.0.1", port, _requests(port, 100), rate=200, seconds=0.5, connections=4)
    assert result.scheduled == 100
    assert result.statuses == {200: 100}
    assert result.failures == 0
    assert len(result.latencies_ms) == len(result.send_lag_ms) == len(result.late_ms) == 100
    assert result.connections_opened < 50  # reused, not reopened for each request
    assert 0.4 < result.seconds < 5


def test_latency_counts_from_the_scheduled_instant_not_from_the_send() -> None:
    # One connection, and the first answer stalls: the requests due meanwhile wait in the client, and that
    # wait is part of their latency (no coordinated omission).
    for port in _serve(stall_first=True):
        result = run_paced("127.0.0.1", port, _requests(port, 40), rate=100, seconds=0.4, connections=1,
                           max_connections=1)
        assert result.statuses == {200: 40}
        assert max(result.latencies_ms) >= STALL_MS * 0.9
        # The request due 100 ms after the first waited about 200 ms for the one connection.
        assert sorted(result.latencies_ms)[-11] >= (STALL_MS - 100) * 0.9
        assert percentile(result.send_lag_ms, 1.0) >= (STALL_MS - 20) * 0.9


def test_a_busy_pool_opens_another_connection_and_the_stall_stays_with_its_request() -> None:
    for port in _serve(stall_first=True):
        result = run_paced("127.0.0.1", port, _requests(port, 40), rate=100, seconds=0.4, connections=1,
                           max_connections=3)
        assert result.statuses == {200: 40}
        assert 2 <= result.connections_opened <= 3
        # The spare connection answered while the first stalled: only the stalled request took the stall.
        assert sorted(result.latencies_ms)[-2] < STALL_MS * 0.8


def test_no_more_connections_than_the_limit_and_the_queue_counts() -> None:
    # Every answer stalls: three connections carry ten requests, three at a time.
    for port in _serve(stall_all=True):
        result = run_paced("127.0.0.1", port, _requests(port, 10), rate=100, seconds=0.1, connections=1,
                           max_connections=3)
        assert result.statuses == {200: 10}
        assert result.connections_opened == 3
        # The tenth waited for three rounds of stalls before its own: about 4 x 300 ms less its 90 ms offset.
        assert max(result.latencies_ms) >= (4 * STALL_MS - 90) * 0.9


def test_answers_that_close_the_connection_are_counted_and_it_is_replaced() -> None:
    for port in _serve(close_each=True):
        result = run_paced("127.0.0.1", port, _requests(port, 30), rate=100, seconds=0.3, connections=2)
        assert result.statuses == {200: 30}
        assert result.connections_opened >= 30


def test_a_refused_port_fails_every_request_without_hanging() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    started = time.monotonic()
    result = run_paced("127.0.0.1", closed, _requests(closed, 20), rate=100, seconds=0.2, connections=2,
                       max_connections=4)
    assert time.monotonic() - started < 5
    assert result.scheduled == 20
    assert result.statuses == {0: 20}
    assert result.failures == 20
