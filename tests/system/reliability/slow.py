"""Slow and hostile clients against a real service.

Slow bodies: ``count`` connections each send complete headers announcing a body, then one byte of it per
second, for as long as the attack lasts. Meanwhile a probe sends ordinary valid verifications, each on a
new connection, at a low rate; the question is whether the probe is still verified, and how fast.

Hostile bodies: as fast as several threads can, bodies that are over the size limit (announced and
chunked), deeply nested JSON, and bytes that are not JSON; every answer must be a 4xx, and the workers'
resident memory is sampled before and after.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from tests.system.reliability.harness import LOOPBACK, VERIFY_PATH, DocumentFactory, percentile, rss_kib

#: Body length the slow clients announce, in bytes: under the 1 MiB limit, so the service must read it.
SLOW_BODY_BYTES: Final = 100_000
#: Seconds between two bytes of a slow body.
SLOW_BYTE_INTERVAL_SECONDS: Final = 1.0
#: A probe verification slower than this, in seconds, counts as not served (a caller would give up).
PROBE_DEADLINE_SECONDS: Final = 5.0
#: Body size limit of the service, in bytes (the contract's 1 MiB).
BODY_LIMIT_BYTES: Final = 1024 * 1024


class SlowBodies:
    """``count`` connections dribbling a request body one byte per interval, from one thread."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.closed_by_server = 0
        self.bytes_sent = 0
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-bodies", daemon=True)

    def __enter__(self) -> SlowBodies:
        head = (f"POST {VERIFY_PATH} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {SLOW_BODY_BYTES}\r\n\r\n").encode()
        for _ in range(self.count):
            sock = socket.create_connection((LOOPBACK, self.port), timeout=5)
            sock.sendall(head + b"{")
            sock.setblocking(False)
            self._sockets.append(sock)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()

    def still_open(self) -> int:
        """Slow connections the server still holds: neither closed nor answered, checked on each socket now."""
        held = 0
        for sock in self._sockets:
            # The sockets are non-blocking: nothing to read means the server still waits for the body; an
            # empty read is a close, bytes are an answer, an error a reset. Only the first counts as held.
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                held += 1
            except OSError:
                pass
        return held

    def _run(self) -> None:
        open_sockets = list(self._sockets)
        while open_sockets and not self._stop.wait(SLOW_BYTE_INTERVAL_SECONDS):
            still_open = []
            for sock in open_sockets:
                try:
                    sock.send(b" ")
                    self.bytes_sent += 1
                    still_open.append(sock)
                except OSError:
                    self.closed_by_server += 1
            open_sockets = still_open
            # A server that answers (408, 400) or closes counts as having dropped the slow client.
            with selectors.DefaultSelector() as selector:
                for sock in open_sockets:
                    selector.register(sock, selectors.EVENT_READ)
                readable = {key.fileobj for key, _ in selector.select(timeout=0)}
            for sock in [sock for sock in open_sockets if sock in readable]:
                with contextlib.suppress(OSError):
                    sock.recv(65536)
                open_sockets.remove(sock)
                self.closed_by_server += 1


@dataclass
class Probe:
    """Valid verifications at ``rate`` per second, each on a new connection, until stopped."""

    port: int
    factory: DocumentFactory
    rate: float
    results: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, latency, status)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Probe:
        start = time.monotonic()
        # Each probe runs on its own thread so that one stuck request does not delay the next one.
        def schedule() -> None:
            index = 0
            while not self._stop.wait(max(0.0, start + index / self.rate - time.monotonic())):
                thread = threading.Thread(target=self._one, daemon=True)
                thread.start()
                self._threads.append(thread)
                index += 1

        self._scheduler = threading.Thread(target=schedule, daemon=True)
        self._scheduler.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._scheduler.join()
        for thread in self._threads:
            thread.join(PROBE_DEADLINE_SECONDS + 1)

    def _one(self) -> None:
        body = self.factory.verify_body(self.factory.new_nonce())
        sent = time.monotonic()
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=PROBE_DEADLINE_SECONDS)
        try:
            connection.request("POST", VERIFY_PATH, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            connection.close()
        self.results.append((sent, time.monotonic() - sent, status))

    def summary(self) -> str:
        """Served count, total, and latency percentiles of the probes."""
        served = [latency for _, latency, status in self.results if status == 200]
        return (f"probes verified: {len(served)}/{len(self.results)}; latency p50 "
                f"{percentile(served, 0.5) * 1000:.0f} ms, p99 {percentile(served, 0.99) * 1000:.0f} ms, "
                f"max {max(served, default=0) * 1000:.0f} ms")

    def served_fraction(self) -> float:
        """Share of probes answered 200 within the deadline."""
        if not self.results:
            return 0.0
        return sum(1 for _, _, status in self.results if status == 200) / len(self.results)


# --- hostile bodies -----------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"document":' + b"[" * depth + b"]" * depth + b"}"


#: name -> (headers, body). Bodies are built once; each is sent many times.
def hostile_requests() -> dict[str, tuple[dict[str, str], bytes]]:
    """The hostile request kinds and their bodies."""
    json_type = {"Content-Type": "application/json"}
    return {
        "oversized": (json_type, b'{"signature":"' + b"A" * (BODY_LIMIT_BYTES + 1024) + b'"}'),
        "nested-100k": (json_type, _nested(100_000)),
        "nested-deep-object": (json_type, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        "not-json": (json_type, os.urandom(4096)),
        "huge-string": (json_type, b'{"signature":"' + b"A" * (BODY_LIMIT_BYTES - 64) + b'"}'),
        "many-keys": (json_type, b"{" + b",".join(b'"k%d":1' % i for i in range(60_000)) + b"}"),
    }


def _send(connection: http.client.HTTPConnection, headers: dict[str, str], body: bytes, chunked: bool) -> int:
    if chunked:
        def chunks() -> object:
            for offset in range(0, len(body), 65536):
                yield body[offset:offset + 65536]
        connection.request("POST", VERIFY_PATH, body=chunks(), headers=headers,  # type: ignore[arg-type]
                           encode_chunked=True)
    else:
        connection.request("POST", VERIFY_PATH, body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status


def hostile_flood(port: int, seconds: float, *, threads: int = 8) -> Counter[str]:
    """Send hostile bodies (each kind, also oversized as chunked) for ``seconds``; count ``kind status``."""
    requests = hostile_requests()
    kinds = [(name, False) for name in requests] + [("oversized", True)]
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(offset: int) -> None:
        index = offset
        while time.monotonic() < deadline:
            name, chunked = kinds[index % len(kinds)]
            index += 1
            headers, body = requests[name]
            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
            try:
                status = _send(connection, headers, body, chunked)
            except (OSError, http.client.HTTPException) as exc:
                # A server may answer 413 and close before reading the rest: the client sees a reset.
                status = f"closed ({type(exc).__name__})"  # type: ignore[assignment]
            finally:
                connection.close()
            with lock:
                counts[f"{name}{' chunked' if chunked else ''} {status}"] += 1

    workers = [threading.Thread(target=run, args=(offset,), daemon=True) for offset in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts


def workers_rss(pids: list[int]) -> dict[int, int]:
    """RSS in KiB of each pid."""
    return {pid: rss_kib(pid) for pid in pids}


# --- one experiment -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class SlowReport:
    """What one slow-client experiment measured."""

    variant: str
    baseline: str
    baseline_fraction: float
    under_attack: str
    under_attack_fraction: float
    slow_dropped: int
    #: Slow connections still held open by the server when the attack ended (checked socket by socket).
    slow_open_at_end: int
    hostile: Counter[str]
    rss_before: dict[int, int]
    rss_after: dict[int, int]
    probe_after: str
    probe_after_fraction: float


def run_slow_clients(service_port: int, worker_pids: list[int], factory: DocumentFactory, *, variant: str,
                     slow_count: int = 100, attack_seconds: float = 20.0, probe_rate: float = 5.0,
                     hostile_seconds: float = 15.0, probe_seconds: float = 3.0) -> SlowReport:
    """Probe alone, probe during ``slow_count`` slow bodies, hostile flood (when ``hostile_seconds``), probe again."""
    with Probe(service_port, factory, probe_rate) as baseline:
        time.sleep(probe_seconds)
    with SlowBodies(service_port, slow_count) as slow:
        time.sleep(2)  # let every slow connection be accepted and read up to its body
        with Probe(service_port, factory, probe_rate) as attacked:
            time.sleep(attack_seconds)
        dropped = slow.closed_by_server
        open_at_end = slow.still_open()
    rss_before = workers_rss(worker_pids)
    hostile = hostile_flood(service_port, hostile_seconds) if hostile_seconds else Counter[str]()
    rss_after = workers_rss(worker_pids)
    with Probe(service_port, factory, probe_rate) as after:
        time.sleep(probe_seconds)
    return SlowReport(variant=variant, baseline=baseline.summary(), baseline_fraction=baseline.served_fraction(),
                      under_attack=attacked.summary(), under_attack_fraction=attacked.served_fraction(),
                      slow_dropped=dropped, slow_open_at_end=open_at_end, hostile=hostile, rss_before=rss_before,
                      rss_after=rss_after,
                      probe_after=after.summary(), probe_after_fraction=after.served_fraction())


# --- stalled near-limit bodies ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StalledReport:
    """What one flood of stalled near-limit bodies did to the service's memory, and how it was answered."""

    #: Resident memory (KiB) of the master and each worker before the flood, and the most seen during it.
    rss_before: dict[int, int]
    rss_peak: dict[int, int]
    #: Answers by status ("none": the connection was still waiting when the flood ended).
    answers: Counter[str]
    #: Body bytes the clients got onto the connections in all.
    sent_bytes: int

    def growth_kib(self, pid: int) -> int:
        """How much ``pid`` grew over the flood, at its peak."""
        return self.rss_peak[pid] - self.rss_before[pid]

    @property
    def peak_total_kib(self) -> int:
        """The most the master and the workers held together (their peaks, summed: an upper bound)."""
        return sum(self.rss_peak.values())


def stalled_flood(port: int, pids: list[int], *, count: int, sources: int, seconds: float,
                  body_bytes: int = BODY_LIMIT_BYTES) -> StalledReport:
    """``count`` connections from ``sources`` loopback addresses, each sending all of a body but its last byte.

    The bodies announce ``body_bytes`` (the limit by default, so the service must take them) and then stall
    one byte short until answered or for ``seconds`` at most, while the resident memory of ``pids`` is sampled.
    """
    head = (f"POST {VERIFY_PATH} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_bytes}\r\n\r\n").encode()
    payload = memoryview(head + b'{"signature":"' + b"A" * (body_bytes - 15))  # all but the body's last byte
    rss_before = workers_rss(pids)
    peak = dict(rss_before)
    sockets: list[socket.socket] = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((f"127.0.1.{index % sources + 1}", 0))  # distinct sources: all of 127/8 is loopback
        sock.connect((LOOPBACK, port))
        sock.setblocking(False)
        sockets.append(sock)
    offsets = dict.fromkeys(sockets, 0)
    answers: Counter[str] = Counter()
    sent = 0
    deadline = time.monotonic() + seconds
    next_sample = 0.0
    try:
        while time.monotonic() < deadline and any(sock.fileno() != -1 for sock in sockets):
            progress = False
            for sock in [sock for sock, offset in offsets.items() if offset < len(payload)]:
                try:
                    written = sock.send(payload[offsets[sock]:offsets[sock] + 262_144])
                except BlockingIOError:
                    continue
                except OSError:
                    offsets[sock] = len(payload)  # refused and closed: nothing more to send
                    continue
                offsets[sock] += written
                sent += written
                progress = True
            for sock in [sock for sock in sockets if sock.fileno() != -1]:
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    continue  # still waiting for an answer
                except OSError:
                    data = b""
                answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"] += 1
                offsets[sock] = len(payload)
                sock.close()
            now = time.monotonic()
            if now >= next_sample:
                for pid, rss in workers_rss(pids).items():
                    peak[pid] = max(peak[pid], rss)
                next_sample = now + 0.05
            if not progress:
                time.sleep(0.01)
    finally:
        waiting = sum(1 for sock in sockets if sock.fileno() != -1)
        if waiting:
            answers["none"] = waiting
        for sock in sockets:
            sock.close()
    return StalledReport(rss_before=rss_before, rss_peak=peak, answers=answers,
                         sent_bytes=sent - count * len(head))
