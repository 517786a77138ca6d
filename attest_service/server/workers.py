"""The service's gunicorn worker: gunicorn's gevent worker, sharing new connections out evenly.

Why: every worker waits on the one listening socket and the kernel wakes them all for a new connection;
the first to run takes it. On a loaded machine that is often the busier worker, already running, and a
keep-alive client stays where it landed: the uneven spread lasts, and the busier worker's clients wait
(the spreads and latencies measured: docs/DEPLOYMENT.md, "Where the latency tail came from").

Each worker counts its open connections in a page of memory shared by the master and the workers (an
anonymous shared mapping made when gunicorn loads this class, before it forks). A worker that holds more
connections than the least loaded other worker leaves a new connection to it: it stops watching the
listening socket for :data:`DEFER_SECONDS` and looks again. A connection left for :data:`MAX_DEFER_SECONDS`
without another worker taking it is taken anyway, and a worker whose event loop has not run for
:data:`STALE_MS` (blocked, stopped, dead and not yet reaped) is left nothing, so a stuck worker holds new
clients back for one connection's :data:`MAX_DEFER_SECONDS` at most. gunicorn has no hook for this: its
gevent worker builds its server inside ``run()``, so :meth:`GeventWorker.run` here is gunicorn's loop around
a server class of ours.
"""

from __future__ import annotations

import mmap
import os
import time
from functools import partial
from typing import Any, Final

import gevent  # type: ignore[import-untyped]
from gevent.monkey import get_original  # type: ignore[import-untyped]
from gevent.pool import Pool  # type: ignore[import-untyped]
from gevent.server import StreamServer  # type: ignore[import-untyped]
from gunicorn.sock import ssl_context  # type: ignore[import-untyped]
from gunicorn.workers import ggevent  # type: ignore[import-untyped]

#: Seconds a busier worker leaves a new connection to the others before it looks again.
DEFER_SECONDS: Final = 0.002
#: Seconds after which a busier worker takes a connection that no other worker took.
MAX_DEFER_SECONDS: Final = 0.02
#: Workers counted at once (a reload briefly runs old and new ones side by side); beyond, a worker accepts
#: as gunicorn's own does.
SLOTS: Final = 256
#: Milliseconds between a worker's signs of life in its slot; a worker silent for STALE_MS (blocked, stopped,
#: or dead and not yet reaped) is not left any connection.
BEAT_MS: Final = 10
STALE_MS: Final = 100
#: Per slot, three signed 64-bit integers: the worker's pid (0: free), its open connections, and when its
#: event loop last ran (CLOCK_MONOTONIC, one clock for every process of the machine, in ms).
_FIELDS: Final = 3


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ConnectionCounts:
    """Open connections per worker, in memory shared across ``fork``.

    Only a worker writes its own count; the master frees a slot when its worker is gone. Aligned 8-byte
    reads and writes are whole on the platforms gunicorn runs on, so no lock is needed for a gauge.
    """

    def __init__(self, slots: int = SLOTS) -> None:
        self._memory = mmap.mmap(-1, slots * _FIELDS * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._values = memoryview(self._memory).cast("q")
        self._claimed: set[int] = set()  # the master's own bookkeeping

    @property
    def slots(self) -> int:
        """How many workers can be counted."""
        return len(self._values) // _FIELDS

    def claim(self) -> int | None:
        """In the master, before a fork: a free slot for the new worker (None when all are taken)."""
        for slot in range(self.slots):
            if slot not in self._claimed:
                self._claimed.add(slot)
                return slot
        return None

    def release(self, slot: int) -> None:
        """In the master, once the worker is gone: the slot counts nobody."""
        self._values[_FIELDS * slot] = 0
        self._values[_FIELDS * slot + 1] = 0
        self._claimed.discard(slot)

    def join(self, slot: int, pid: int, now_ms: int) -> None:
        """In the worker, when it starts accepting: counted, with no connections yet."""
        self._values[_FIELDS * slot + 1] = 0
        self._values[_FIELDS * slot + 2] = now_ms
        self._values[_FIELDS * slot] = pid

    def leave(self, slot: int) -> None:
        """In the worker, when it stops accepting: the others no longer leave connections to it."""
        self._values[_FIELDS * slot] = 0

    def beat(self, slot: int, now_ms: int) -> None:
        """In the worker, from its event loop: it is running."""
        self._values[_FIELDS * slot + 2] = now_ms

    def add(self, slot: int, delta: int) -> None:
        """In the worker: a connection opened (+1) or closed (-1)."""
        self._values[_FIELDS * slot + 1] += delta

    def busier_than_another(self, slot: int, now_ms: int) -> bool:
        """Whether another accepting worker, running lately, holds fewer open connections than ``slot``'s."""
        values = self._values
        mine = values[_FIELDS * slot + 1]
        for other in range(self.slots):
            base = _FIELDS * other
            if (other != slot and values[base] and values[base + 1] < mine
                    and now_ms - values[base + 2] < STALE_MS):
                return True
        return False


#: The counts of this master's workers (made in the master when gunicorn loads the worker class).
COUNTS: Final = ConnectionCounts()


class Deferral:
    """When a busier worker leaves a new connection to the others, and when it takes it anyway."""

    def __init__(self, counts: ConnectionCounts, slot: int) -> None:
        self._counts = counts
        self._slot = slot
        self._since: float | None = None

    def leave_to_others(self, now: float) -> bool:
        """Whether to leave the waiting connection to a less loaded worker at instant ``now`` (monotonic)."""
        if not self._counts.busier_than_another(self._slot, int(now * 1000)):
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since < MAX_DEFER_SECONDS

    def taken(self) -> None:
        """The connection left was taken by another worker (or this one took a connection)."""
        self._since = None


class _BalancedServer(StreamServer):  # type: ignore[misc]  # gevent ships no type information
    """gevent's stream server, counting its connections and leaving new ones to less loaded workers."""

    def __init__(self, *args: Any, counts: ConnectionCounts, slot: int, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self._counts = counts
        self._slot = slot
        self._deferral = Deferral(counts, slot)
        self._resume: Any = None
        self._poll = get_original("select", "poll")

    def do_read(self) -> Any:  # noqa: ANN401 - gevent's (socket, address) or None
        """Accept a waiting connection, unless a less loaded worker should take it."""
        if self._deferral.leave_to_others(time.monotonic()):
            self.stop_accepting()
            if self._resume is None:
                self._resume = self.loop.timer(DEFER_SECONDS)
                self._resume.start(self._look_again)
            return None
        accepted = super().do_read()
        if accepted is not None:
            self._deferral.taken()
            self._counts.add(self._slot, 1)
        return accepted

    def do_close(self, *args: Any) -> None:  # noqa: ANN401 - gevent's (socket, address)
        """Close a finished connection and count it out."""
        try:
            super().do_close(*args)
        finally:
            self._counts.add(self._slot, -1)

    def _look_again(self) -> None:
        self._resume.close()
        self._resume = None
        if not self.started:  # closed meanwhile (the worker is stopping)
            return
        if not self._waiting():
            self._deferral.taken()
        self._start_accepting_if_started()

    def _waiting(self) -> bool:
        # A zero-timeout poll of the listening socket, outside gevent's cooperative poll (this runs in the hub).
        poller = self._poll()
        poller.register(self.socket.fileno(), 1)  # POLLIN
        return bool(poller.poll(0))


class GeventWorker(ggevent.GeventWorker):  # type: ignore[misc]  # gunicorn ships no type information
    """gunicorn's gevent worker whose servers share new connections out evenly over the workers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - gunicorn's worker arguments
        super().__init__(*args, **kwargs)
        # In the master, before the fork: the slot this worker counts its connections in.
        self.connection_slot = COUNTS.claim()

    def run(self) -> None:
        """Gunicorn's gevent loop (serve, heartbeat, graceful stop) around balanced servers."""
        slot = self.connection_slot
        if slot is None:
            super().run()
            return
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            server = _BalancedServer(listener, handle=partial(self.handle, listener),
                                     spawn=Pool(self.worker_connections), counts=COUNTS, slot=slot, **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1
            servers.append(server)
        COUNTS.join(slot, os.getpid(), _now_ms())
        beat = gevent.get_hub().loop.timer(BEAT_MS / 1000, BEAT_MS / 1000)
        beat.start(lambda: COUNTS.beat(slot, _now_ms()))
        for server in servers:
            server.start()
        try:
            while self.alive:
                self.notify()
                gevent.sleep(1.0)
        finally:
            COUNTS.leave(slot)
            beat.close()
        try:
            self._stop(servers)
        except Exception:  # gunicorn's own loop ignores these too: the worker exits either way
            self.log.exception("stopping the servers of worker %s failed", self.pid)

    def release_connection_slot(self) -> None:
        """In the master, once this worker has exited: its slot counts nobody."""
        if self.connection_slot is not None:
            COUNTS.release(self.connection_slot)
            self.connection_slot = None

    def _stop(self, servers: list[Any]) -> None:
        # As gunicorn's gevent worker: stop accepting, finish the current requests within graceful_timeout.
        for server in servers:
            server.close()
        started = time.time()
        while time.time() - started <= self.cfg.graceful_timeout:
            if all(server.pool.free_count() == server.pool.size for server in servers):
                return
            self.notify()
            gevent.sleep(1.0)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        for server in servers:
            server.stop(timeout=1)

