"""An open-loop HTTP/1.1 client for latency: requests leave on a fixed schedule, whatever the server does.

A closed-loop client (wrk, or a thread per connection) sends the next request only after the previous answer,
so a stalled server also stalls the clock that measures it ("coordinated omission"). Here request ``i`` is
due at ``start + i / rate`` and its latency is counted from that instant to the last byte of the answer:
time spent waiting for a free connection, in the kernel's accept queue or behind other requests in a worker
all counts. Connections are kept alive and reused least-recently-used first, so a pool of ``connections``
spreads the load over them (and over the workers they landed on); when every connection is busy a new one is
opened, up to ``max_connections``, and beyond that requests wait in the client's queue (counted too).

One asyncio loop in one thread, hand-written request bytes and a minimal response parser (status line,
``Content-Length``, ``Connection: close``). asyncio's loop still costs about 0.2 ms of CPU per request on a
small virtual machine (``bench_http.py`` prints the figure), a fifth of a core at 1,000 requests/s taken from
the servers it measures on two cores. The send lag (actual send minus scheduled instant) is reported
separately: when it is large the client, not the server, was late.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

#: Seconds an answer may take before the request counts as timed out (status 0).
TIMEOUT_SECONDS: Final = 10.0
_HEADER_END: Final = b"\r\n\r\n"


def post_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one ``POST path`` with a JSON ``body`` (and ``headers``), ready to write to a socket."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@dataclass
class Result:
    """What one paced run saw.

    ``latencies_ms`` count from each request's scheduled instant; ``send_lag_ms`` from that instant to the
    request's first byte written (waiting for a free connection included); ``late_ms`` from that instant to
    when the client's loop got round to it (the client's own lateness: large values mean a busy client).
    """

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    send_lag_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)
    connections_opened: int = 0
    scheduled: int = 0
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        """Requests that got an answer (any status)."""
        return len(self.latencies_ms)

    @property
    def failures(self) -> int:
        """Answers other than 2xx, plus timeouts and broken connections (status 0)."""
        return sum(count for status, count in self.statuses.items() if not 200 <= status < 300)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` by nearest rank (``nan`` when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))]


def distribution(values: Sequence[float]) -> str:
    """``p50 a ms, p99 b ms, p99.9 c ms, max d ms (n samples)``."""
    return (f"p50 {percentile(values, 0.5):6.2f} ms, p99 {percentile(values, 0.99):6.2f} ms, "
            f"p99.9 {percentile(values, 0.999):6.2f} ms, max {max(values, default=float('nan')):6.2f} ms "
            f"({len(values)} samples)")


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due: float | None = None
        self.expected: int | None = None
        self.status = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # TCP connections only
        self.transport = transport
        self.client.ready(self)

    def send(self, due: float, request: bytes) -> None:
        assert self.transport is not None  # only ready connections get requests
        self.due = due
        self.buffer.clear()
        self.expected = None
        self.client.sent(due)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.expected is None:
            end = self.buffer.find(_HEADER_END)
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            length = 0
            self.close_after = head[0].startswith("HTTP/1.0")
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    self.close_after = value.strip().lower() == "close"
            self.expected = end + len(_HEADER_END) + length
        if len(self.buffer) >= self.expected:
            self._finish(self.status)

    def _finish(self, status: int) -> None:
        due, self.due = self.due, None
        if due is not None:
            self.client.answered(self, due, status, reusable=not self.close_after and status != 0)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self.transport = None
        if self.due is not None:
            self._finish(0)
        self.client.lost(self)


class _Client:
    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, *, max_connections: int,
                 result: Result) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.result = result
        self.idle: deque[_Connection] = deque()
        self.waiting: deque[tuple[float, bytes]] = deque()
        self.open = 0  # connected or connecting
        self.busy = 0
        self.idle_event = asyncio.Event()

    def connect(self) -> None:
        self.open += 1
        self.result.connections_opened += 1
        task = self.loop.create_task(self.loop.create_connection(lambda: _Connection(self), self.host, self.port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.open -= 1
            if self.waiting:
                due, _ = self.waiting.popleft()
                self._record(due, 0)

    def submit(self, due: float, request: bytes) -> None:
        self.result.late_ms.append((self.loop.time() - due) * 1000)
        if self.idle:
            self.busy += 1
            self.idle.popleft().send(due, request)
            return
        self.waiting.append((due, request))
        if self.open < self.max_connections:
            self.connect()

    def ready(self, connection: _Connection) -> None:
        if self.waiting:
            self.busy += 1
            connection.send(*self.waiting.popleft())
        else:
            self.idle.append(connection)
            self.idle_event.set()

    def sent(self, due: float) -> None:
        self.result.send_lag_ms.append((self.loop.time() - due) * 1000)

    def _record(self, due: float, status: int) -> None:
        self.result.latencies_ms.append((self.loop.time() - due) * 1000)
        self.result.statuses[status] += 1

    def answered(self, connection: _Connection, due: float, status: int, *, reusable: bool) -> None:
        self.busy -= 1
        self._record(due, status)
        if reusable:
            self.ready(connection)
        elif connection.transport is not None:
            connection.transport.close()

    def lost(self, connection: _Connection) -> None:
        self.open -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if self.waiting and self.open < self.max_connections:
            self.connect()

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()


async def _paced(host: str, port: int, requests: Sequence[bytes], rate: float, seconds: float, *,
                 connections: int, max_connections: int) -> Result:
    loop = asyncio.get_running_loop()
    result = Result()
    client = _Client(loop, host, port, max_connections=max_connections, result=result)
    for _ in range(connections):
        client.connect()
    # Connections first, so that the first requests do not pay for the handshakes.
    deadline = loop.time() + 5.0
    while len(client.idle) < connections and loop.time() < deadline:
        client.idle_event.clear()
        try:
            await asyncio.wait_for(client.idle_event.wait(), timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            break
    count = min(len(requests), int(rate * seconds))
    start = loop.time() + 0.05
    for index in range(count):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        client.submit(due, requests[index])
    result.scheduled = count
    finish = loop.time() + TIMEOUT_SECONDS
    while result.answered < count and loop.time() < finish:
        await asyncio.sleep(0.01)
    unanswered = count - result.answered
    result.statuses[0] += max(0, unanswered)
    result.latencies_ms.extend([TIMEOUT_SECONDS * 1000] * max(0, unanswered))
    result.seconds = loop.time() - start
    client.close()
    return result


def run_paced(host: str, port: int, requests: Sequence[bytes], *, rate: float, seconds: float,
              connections: int = 16, max_connections: int = 64) -> Result:
    """Send ``requests`` in order at ``rate`` per second for ``seconds`` (or until they run out).

    ``connections`` are opened before the first request is due; more are opened while all are busy, up to
    ``max_connections``. Returns when every request was answered or timed out.
    """
    started = time.monotonic()
    result = asyncio.run(_paced(host, port, requests, rate, seconds, connections=connections,
                                max_connections=max_connections))
    result.seconds = result.seconds or time.monotonic() - started
    return result
