"""An open-loop HTTP/1.1 client for latency: requests leave on a fixed schedule, whatever the server does.

A closed-loop client (wrk, or a thread per connection) sends the next request only after the previous answer,
so a stalled server also stalls the clock that measures it ("coordinated omission"). Here request ``i`` is
due at ``start + i / rate`` and its latency is counted from that instant to the last byte of the answer:
time spent waiting for a free connection, in the kernel's accept queue or behind other requests in a worker
all counts. Connections are kept alive and reused least-recently-used first, so a pool of ``connections``
spreads the load over them (and over the workers they landed on); when every connection is busy a new one is
opened, up to ``max_connections``, and beyond that requests wait in the client's queue (counted too).

One thread, one ``epoll`` loop over non-blocking sockets, hand-written request bytes and a minimal response
parser (status line, ``Content-Length``, ``Connection: close``). The client shares the cores with the servers
it measures, so its own CPU is kept small: an asyncio version of this loop took about 0.2 ms per request on a
small virtual machine, a fifth of a core at 1,000 requests/s (``bench_http.py`` prints the figure). The send
lag (actual send minus scheduled instant) is reported separately: when it is large the client, not the
server, was late.
"""

from __future__ import annotations

import errno
import re
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

#: Seconds the client waits, after the last request is due, for the answers still out; those that have not
#: come then count as timed out (status 0).
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


_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_RECEIVE_BYTES: Final = 65536
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE: Final = re.compile(rb"\r\nconnection:[ \t]*close[ \t]*\r\n", re.IGNORECASE)


class _Connection:
    """One keep-alive connection carrying one request at a time."""

    __slots__ = ("buffer", "close_after", "connected", "due", "expected", "pending", "sock", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connected = False
        self.buffer = bytearray()
        self.pending = b""  # request bytes the socket did not take yet
        self.due: float | None = None
        self.expected: int | None = None
        self.status = 0
        self.close_after = False

    def parse(self) -> bool:
        """Whether the buffer now holds a whole answer (its status and framing are then set)."""
        if self.expected is None:
            end = self.buffer.find(_HEADER_END)
            if end < 0:
                return False
            # "HTTP/1.1 200 ...": the status is the three digits after the first space.
            space = self.buffer.find(b" ")
            self.status = int(self.buffer[space + 1:space + 4])
            length = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
            self.close_after = (self.buffer.startswith(b"HTTP/1.0")
                                or _CONNECTION_CLOSE.search(self.buffer, 0, end + 2) is not None)
            self.expected = end + len(_HEADER_END) + (int(length.group(1)) if length else 0)
        return len(self.buffer) >= self.expected


class _Client:
    """The connections, the requests waiting for one, and what was measured."""

    def __init__(self, host: str, port: int, *, max_connections: int, result: Result) -> None:
        self.address = (host, port)
        self.max_connections = max_connections
        self.result = result
        self.poller = select.epoll()
        self.connections: dict[int, _Connection] = {}  # by file descriptor: connected or connecting
        self.idle: deque[_Connection] = deque()  # least recently used first
        self.waiting: deque[tuple[float, bytes]] = deque()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.result.connections_opened += 1
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._refused()
            return
        connection = _Connection(sock)
        self.connections[sock.fileno()] = connection
        self.poller.register(sock.fileno(), _OUT)  # writable once connected

    def submit(self, due: float, request: bytes, now: float) -> None:
        self.result.late_ms.append((now - due) * 1000)
        if self.idle:
            self._send(self.idle.popleft(), due, request, now)
            return
        self.waiting.append((due, request))
        if len(self.connections) < self.max_connections:
            self.connect()

    def _send(self, connection: _Connection, due: float, request: bytes, now: float) -> None:
        connection.due = due
        connection.buffer.clear()
        connection.expected = None
        self.result.send_lag_ms.append((now - due) * 1000)
        try:
            sent = connection.sock.send(request)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost(connection, now)
            return
        if sent < len(request):
            connection.pending = request[sent:]
            self.poller.modify(connection.sock.fileno(), _IN | _OUT)

    def _ready(self, connection: _Connection, now: float) -> None:
        if self.waiting:
            self._send(connection, *self.waiting.popleft(), now)
        else:
            self.idle.append(connection)

    def _record(self, due: float, status: int, now: float) -> None:
        self.result.latencies_ms.append((now - due) * 1000)
        self.result.statuses[status] += 1

    def _refused(self) -> None:
        # A connection that could not be made answers the oldest waiting request with status 0.
        if self.waiting:
            due, _ = self.waiting.popleft()
            self._record(due, 0, time.monotonic())

    def _lost(self, connection: _Connection, now: float) -> None:
        fd = connection.sock.fileno()
        self.connections.pop(fd, None)
        self.poller.unregister(fd)
        connection.sock.close()
        if connection in self.idle:
            self.idle.remove(connection)
        if not connection.connected:
            self._refused()
        elif connection.due is not None:
            due, connection.due = connection.due, None
            self._record(due, 0, now)
        if self.waiting and len(self.connections) < self.max_connections:
            self.connect()

    def handle(self, fd: int, events: int, now: float) -> None:
        connection = self.connections.get(fd)
        if connection is None:
            return
        if not connection.connected:
            if connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._lost(connection, now)
                return
            connection.connected = True
            self.poller.modify(fd, _IN)
            self._ready(connection, now)
            return
        if events & _OUT and connection.pending:
            try:
                sent = connection.sock.send(connection.pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost(connection, now)
                return
            connection.pending = connection.pending[sent:]
            if not connection.pending:
                self.poller.modify(fd, _IN)
        if events & (_IN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = connection.sock.recv(_RECEIVE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost(connection, now)
                return
            connection.buffer += data
            if connection.due is not None and connection.parse():
                due, connection.due = connection.due, None
                self._record(due, connection.status, now)
                # An answer that came before its request was all sent (an early 413, say) leaves the rest of
                # the request unsent: the connection cannot carry another one.
                if connection.close_after or connection.pending:
                    self._lost(connection, now)
                else:
                    self._ready(connection, now)

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for socket events and handle them."""
        for fd, mask in self.poller.poll(max(0.0, timeout)):
            self.handle(fd, mask, time.monotonic())

    def close(self) -> None:
        for connection in self.connections.values():
            connection.sock.close()
        self.connections.clear()
        self.poller.close()


def run_paced(host: str, port: int, requests: Sequence[bytes], *, rate: float, seconds: float,
              connections: int = 16, max_connections: int = 64) -> Result:
    """Send ``requests`` in order at ``rate`` per second for ``seconds`` (or until they run out).

    ``connections`` are opened before the first request is due; more are opened while all are busy, up to
    ``max_connections``. Returns when every request was answered or timed out.
    """
    result = Result()
    client = _Client(host, port, max_connections=max_connections, result=result)
    try:
        for _ in range(connections):
            client.connect()
        # Connections first, so that the first requests do not pay for the handshakes.
        deadline = time.monotonic() + 5.0
        while len(client.idle) < connections and client.connections and time.monotonic() < deadline:
            client.poll(0.01)
        count = min(len(requests), int(rate * seconds))
        start = time.monotonic() + 0.05
        index = 0
        while index < count:
            now = time.monotonic()
            while index < count and start + index / rate <= now:
                client.submit(start + index / rate, requests[index], now)
                index += 1
            if index < count:
                client.poll(start + index / rate - time.monotonic())
        result.scheduled = count
        finish = time.monotonic() + TIMEOUT_SECONDS
        while result.answered < count and time.monotonic() < finish:
            client.poll(min(0.01, finish - time.monotonic()))
        unanswered = count - result.answered
        if unanswered > 0:
            result.statuses[0] += unanswered
            result.latencies_ms.extend([TIMEOUT_SECONDS * 1000] * unanswered)
        result.seconds = time.monotonic() - start
    finally:
        client.close()
    return result
