"""Real processes and a paced load generator for the reliability tests and benchmarks.

Everything runs on loopback: a test PKI written as a pinned directory (``ATTEST_PINNED_CERTS``), a real
``redis-server`` (:mod:`tests.support.redis_server`), ``attest-service serve`` (real gunicorn with the
shipped configuration module) and a load generator that posts documents at a set rate from many threads,
each on its own keep-alive connection, and records every answer with the phase it was sent in.

Documents are signed when they are sent (RSA-2048, Azure's shape), each with a fresh nonce, so every
valid document is a first use. The generator also sends replays of nonces already accepted (which must
get 409), documents with a tampered signature (422) and bodies that are not JSON (400).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from attest_service.imds import pki
from tests.support.redis_server import free_port

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
LOOPBACK: Final = "127.0.0.1"
VERIFY_PATH: Final = "/v1/verify"

#: Seconds the service may take until /healthz answers (workers import Flask and load the pins).
STARTUP_TIMEOUT_SECONDS: Final = 30.0
#: Seconds gunicorn gets to stop after SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_SECONDS: Final = 25.0
#: Seconds a load-generator request may take before it counts as hung (status 0, code "timeout").
CLIENT_TIMEOUT_SECONDS: Final = 15.0
#: Rate limit given to the service under test, per minute: far above any load here, so that 429s
#: never mix with the faults being measured (the limit itself is tested elsewhere).
UNLIMITED_RATE_PER_MINUTE: Final = 1_000_000
#: Redis options that make every accepted nonce durable before the reply (appendfsync always), so a
#: restarted Redis still holds what it acknowledged and the "every 200 is recorded" check is meaningful.
DURABLE_REDIS_ARGS: Final = ("--appendonly", "yes", "--appendfsync", "always")

#: Share of each request kind the load generator sends (the rest are valid first uses).
REPLAY_SHARE: Final = 0.1
TAMPERED_SHARE: Final = 0.1
GARBAGE_SHARE: Final = 0.05


# --- documents ----------------------------------------------------------------------------------------


class DocumentFactory:
    """An Azure-shaped test PKI, its pinned directory, and documents signed by its leaf."""

    def __init__(self, pinned_dir: Path) -> None:
        now = datetime.now(UTC)
        self.root, self.issuing_ca, self.leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
        self.pinned_dir = pinned_dir
        pki.write_pinned_dir(pinned_dir, "public", root=self.root.certificate,
                             intermediates=[self.issuing_ca.certificate])
        self._counter = itertools.count()

    def new_nonce(self) -> str:
        """A nonce never used before (IMDS allows 32 characters)."""
        return f"r{next(self._counter):07d}{uuid.uuid4().hex[:16]}"

    def document(self, nonce: str) -> dict[str, str]:
        """The IMDS response object of a fresh valid document signing ``nonce``."""
        now = datetime.now(UTC)
        # One VM for every document: a replay signed again over an accepted nonce is that VM's (nonces are
        # claimed per VM), so it must be refused.
        content = pki.attested_content(nonce=nonce, vm_id="5d1e0a7c-0000-4000-8000-00000000c001",
                                       subscription_id="8a205152-0000-4000-8000-000000000001", sku="22_04-lts-gen2",
                                       plan=("", "", ""), license_type="", created_on=now,
                                       expires_on=now + pki.DOCUMENT_LIFETIME)
        signature = pki.sign_attested(content, signer=self.leaf)
        return {"encoding": "pkcs7", "signature": base64.b64encode(signature).decode("ascii")}

    def verify_body(self, nonce: str) -> bytes:
        """A ``/v1/verify`` body with a fresh document for ``nonce``."""
        return json.dumps({"document": self.document(nonce)}).encode()

    def tampered_body(self) -> bytes:
        """A body whose document's signature is broken (one byte of the RSA signature flipped)."""
        response = self.document(self.new_nonce())
        der = bytearray(base64.b64decode(response["signature"]))
        der[-10] ^= 0x01  # inside the SignerInfo signature, the last field of the structure
        response["signature"] = base64.b64encode(bytes(der)).decode("ascii")
        return json.dumps({"document": response}).encode()


GARBAGE_BODY: Final = b"{not json"


# --- the service --------------------------------------------------------------------------------------


@dataclass
class Service:
    """A running ``attest-service serve``: its address, master process and log."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def master_pid(self) -> int:
        """The gunicorn master (``serve`` execs gunicorn in place, so it is the process started)."""
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """Current worker processes: the master's children."""
        return children(self.master_pid)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """``GET path``; returns status and body."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, path: str, body: bytes, timeout: float = CLIENT_TIMEOUT_SECONDS) -> tuple[int, bytes]:
        """``POST path`` with a JSON body; returns status and body."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS), 0 when the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def service_env(*, pinned_dir: Path, store_url: str, store_timeout: float = 0.5,
                trust_reload_seconds: float = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``ATTEST_*`` settings of a service under test."""
    return {
        "ATTEST_PINNED_CERTS": str(pinned_dir),
        "ATTEST_NONCE_STORE": store_url,
        "ATTEST_STORE_TIMEOUT_SECONDS": str(store_timeout),
        "ATTEST_RATE_LIMIT_PER_MINUTE": str(UNLIMITED_RATE_PER_MINUTE),
        "ATTEST_TRUST_RELOAD_SECONDS": str(trust_reload_seconds),
        "ATTEST_LOG_LEVEL": "warning",
        **(extra or {}),
    }


@contextlib.contextmanager
def running_service(env: dict[str, str], workdir: Path, *, workers: int = 2,
                    argv: list[str] | None = None) -> Iterator[Service]:
    """Run ``attest-service serve --workers N`` (or ``argv``, with ``{port}`` filled in); stop it on exit."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    metrics_dir = workdir / f"metrics-{port}"
    metrics_dir.mkdir(parents=True)
    # Without a policy file and keys the service is open (anonymous callers use their own nonces).
    base = {key: value for key, value in os.environ.items()
            if not key.startswith("ATTEST_") or key == "ATTEST_AZURE_REAL_DIR"}
    full_env = {**base, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env}
    command = ([part.format(port=port) for part in argv] if argv else
               [sys.executable, "-m", "attest_service", "serve", "--bind", f"{LOOPBACK}:{port}",
                "--workers", str(workers)])
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=full_env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=REPO_ROOT)
    service = Service(port=port, process=process, log=log)
    try:
        wait_healthy(service)
        yield service
    finally:
        stop_process_group(process)


def wait_healthy(service: Service, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    """Wait until /healthz answers 200; raise with the log tail when the service dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"serve exited with {service.process.returncode}:\n{tail(service.log)}")
        with contextlib.suppress(OSError):
            if service.get("/healthz", timeout=1.0)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"serve did not become healthy:\n{tail(service.log)}")


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group started with ``start_new_session``; SIGKILL it after the grace period."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Workers orphaned by a killed master would keep the port; the group kill reaches them too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


#: Worker classes a run can use, as gunicorn arguments added after the shipped configuration module.
WORKER_VARIANTS: Final[dict[str, list[str]]] = {
    "shipped": [],
    # The threaded workers shipped before gevent, kept for comparison in the benchmark scripts.
    "gthread": ["--worker-class", "gthread", "--threads", "4"],
}


def gunicorn_argv(variant: str, workers: int = 2) -> list[str] | None:
    """The command running the service with the shipped configuration plus a variant's overrides.

    ``None`` for the shipped variant: :func:`running_service` then runs ``attest-service serve`` itself.
    Command-line options override the configuration module's values in gunicorn.
    """
    extra = WORKER_VARIANTS[variant]
    if not extra:
        return None
    return [sys.executable, "-m", "gunicorn", "--config", "python:attest_service.server.gunicorn_conf",
            "--bind", LOOPBACK + ":{port}", "--workers", str(workers), *extra, "attest_service.web:create_app()"]


# --- the pinned directory -----------------------------------------------------------------------------


def replace_with_garbage(pinned_dir: Path) -> Path:
    """Move ``pinned_dir`` aside and put a directory of unusable PEM files in its place; return the backup."""
    backup = pinned_dir.with_name(pinned_dir.name + ".good")
    pinned_dir.rename(backup)
    for cloud in ("public", "usgov"):
        for role in ("roots", "intermediates"):
            directory = pinned_dir / cloud / role
            directory.mkdir(parents=True)
            (directory / "garbage.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                                                    b"-----END CERTIFICATE-----\n" + os.urandom(64))
    return backup


def restore(pinned_dir: Path, backup: Path) -> None:
    """Put the good pinned directory back (by rename, so a reader sees the old tree or the new one)."""
    shutil.rmtree(pinned_dir)
    backup.rename(pinned_dir)


# --- the load generator -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shot:
    """One request the generator sent and what came back."""

    phase: str
    kind: str  # valid, replay, tampered, garbage
    nonce: str | None
    sent: float  # time.monotonic() when the request was written
    latency: float  # seconds until the whole response was read
    status: int  # 0: no HTTP answer (connection error or client timeout)
    code: str | None  # the error code of the body, or "ok", or the exception name


@dataclass
class Load:
    """A paced, open-loop load: ``rate`` requests per second from ``threads`` connections until stopped."""

    service_port: int
    factory: DocumentFactory
    rate: float
    threads: int = 32
    mix: bool = True
    phase: str = "warm-up"
    shots: list[Shot] = field(default_factory=list)
    _accepted: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _slot: Iterator[int] = field(default_factory=itertools.count)

    def start(self) -> Load:
        """Start the sender threads."""
        self._start = time.monotonic()
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> None:
        """Stop sending and wait for requests in flight."""
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=CLIENT_TIMEOUT_SECONDS + 5)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next_request(self, rng: random.Random) -> tuple[str, str | None, bytes]:
        draw = rng.random() if self.mix else 1.0
        if draw < GARBAGE_SHARE:
            return "garbage", None, GARBAGE_BODY
        if draw < GARBAGE_SHARE + TAMPERED_SHARE:
            return "tampered", None, self.factory.tampered_body()
        if draw < GARBAGE_SHARE + TAMPERED_SHARE + REPLAY_SHARE:
            with self._lock:
                nonce = rng.choice(self._accepted) if self._accepted else None
            if nonce is not None:
                return "replay", nonce, self.factory.verify_body(nonce)
        nonce = self.factory.new_nonce()
        return "valid", nonce, self.factory.verify_body(nonce)

    def _run(self) -> None:
        rng = random.Random()  # picks request kinds, not secrets
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            with self._lock:
                slot = next(self._slot)
            due = self._start + slot / self.rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            kind, nonce, body = self._next_request(rng)
            phase = self.phase
            if connection is None:
                connection = http.client.HTTPConnection(LOOPBACK, self.service_port, timeout=CLIENT_TIMEOUT_SECONDS)
            sent = time.monotonic()
            try:
                connection.request("POST", VERIFY_PATH, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
                status = response.status
                code = _code(status, data)
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException) as exc:
                status, code = 0, type(exc).__name__
                connection.close()
                connection = None
            shot = Shot(phase=phase, kind=kind, nonce=nonce, sent=sent, latency=time.monotonic() - sent,
                        status=status, code=code)
            with self._lock:
                self.shots.append(shot)
                if status == 200 and kind == "valid" and nonce is not None:
                    self._accepted.append(nonce)
        if connection is not None:
            connection.close()


def _code(status: int, data: bytes) -> str:
    if status == 200:
        return "ok"
    try:
        body = json.loads(data)
        return str(body["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http-{status}"


def closed_loop_capacity(service_port: int, factory: DocumentFactory, *, seconds: float,
                         connections: int = 16) -> float:
    """Valid verifications per second with ``connections`` clients sending back to back.

    Each client signs its documents as it goes, as the paced load does, so the figure is the capacity of
    this machine with this load generator on it, and half of it is a rate the generator can keep.
    """
    lock = threading.Lock()
    done = Counter[int]()
    deadline = time.monotonic() + seconds

    def run() -> None:
        connection = http.client.HTTPConnection(LOOPBACK, service_port, timeout=CLIENT_TIMEOUT_SECONDS)
        try:
            while time.monotonic() < deadline:
                body = factory.verify_body(factory.new_nonce())
                connection.request("POST", VERIFY_PATH, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                with lock:
                    done[response.status] += 1
        finally:
            connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=run, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[200] / (time.monotonic() - started)


# --- reporting ----------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def phase_table(shots: list[Shot], phases: list[str]) -> str:
    """Counts per status and code, and latency percentiles, for each phase."""
    lines = [f"{'phase':<16} {'sent':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses (code: count)"]
    for phase in phases:
        selected = [shot for shot in shots if shot.phase == phase]
        latencies = [shot.latency * 1000 for shot in selected]
        counts = Counter(f"{shot.status} {shot.code}" for shot in selected)
        described = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))
        lines.append(f"{phase:<16} {len(selected):>6} {percentile(latencies, 0.5):>8.1f} "
                     f"{percentile(latencies, 0.99):>8.1f} {max(latencies, default=0):>8.1f}  {described}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Violations:
    """What the fault runs must never see; every list empty means the run passed."""

    unrecorded: list[str]  # nonces answered 200 but absent from the store afterwards
    accepted_twice: list[str]  # nonces answered 200 more than once
    bad_statuses: list[Shot]  # 5xx other than 503 store_unavailable, or no answer at all
    slow_503: list[Shot]  # 503s slower than the allowed bound
    wrong_outcomes: list[Shot]  # replays/tampered/garbage not refused with their 4xx, valid not 200/503

    def ok(self) -> bool:
        """Whether no invariant was broken."""
        return not (self.unrecorded or self.accepted_twice or self.bad_statuses or self.slow_503
                    or self.wrong_outcomes)

    def describe(self) -> str:
        """A short account of each broken invariant."""
        return (f"unrecorded={len(self.unrecorded)} {self.unrecorded[:3]}; "
                f"accepted twice={len(self.accepted_twice)} {self.accepted_twice[:3]}; "
                f"bad statuses={len(self.bad_statuses)} {self.bad_statuses[:3]}; "
                f"slow 503={len(self.slow_503)} {self.slow_503[:3]}; "
                f"wrong outcomes={len(self.wrong_outcomes)} {self.wrong_outcomes[:3]}")


#: What each kind of request may be answered with, besides 503 store_unavailable. A replay repeats a
#: nonce only after that nonce's 200 was read, so it is always a second use and must get 409.
EXPECTED: Final[dict[str, set[str]]] = {
    "valid": {"200 ok"},
    "replay": {"409 nonce_replayed"},
    "tampered": {"422 signature_invalid"},
    "garbage": {"400 malformed_request"},
}


def check_invariants(shots: list[Shot], *, recorded: Callable[[str], bool], max_503_seconds: float,
                     disconnect_phases: frozenset[str] = frozenset()) -> Violations:
    """Check a fault run: nonces recorded and accepted once, only 503 store_unavailable as 5xx, fast 503s.

    In ``disconnect_phases`` (a worker killed) a request without an HTTP answer is expected: the dead
    worker's connections break, and the caller is told so by the connection, not by a status.
    """
    accepted = Counter(shot.nonce for shot in shots if shot.status == 200 and shot.nonce is not None)
    store_down = "503 store_unavailable"
    return Violations(
        unrecorded=[nonce for nonce in accepted if not recorded(nonce)],
        accepted_twice=[nonce for nonce, count in accepted.items() if count > 1],
        bad_statuses=[shot for shot in shots
                      if (shot.status == 0 and shot.phase not in disconnect_phases)
                      or (shot.status >= 500 and f"{shot.status} {shot.code}" != store_down)],
        slow_503=[shot for shot in shots if shot.status == 503 and shot.latency > max_503_seconds],
        wrong_outcomes=[shot for shot in shots if 0 < shot.status < 500
                        and f"{shot.status} {shot.code}" not in EXPECTED[shot.kind]],
    )


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Poll ``predicate`` until true; return the seconds it took, or raise TimeoutError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0
