"""A real ``attest-service serve`` (gunicorn) process on a free loopback port or a Unix socket, for end-to-end tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

from tests.support.redis_server import free_port

#: Seconds the service may take until /healthz answers (workers import Flask and load the pins).
STARTUP_TIMEOUT_SECONDS = 20.0
#: Seconds gunicorn gets to stop after SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_SECONDS = 25.0

class UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: what a local reverse proxy does, without listening on any network address."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.unix_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class LiveService:
    """The running service: its address, its master's pid and a way to send JSON requests."""

    def __init__(self, port: int, log: Path, *, pid: int = 0, unix_path: Path | None = None,
                 metrics_dir: Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.log = log
        self.pid = pid
        self.unix_path = unix_path
        self.metrics_dir = metrics_dir

    def worker_pids(self) -> list[int]:
        """The gunicorn master's children: its workers."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return sorted(int(pid) for pid in children.read_text().split()) if children.exists() else []

    def counted_by_process(self, sample: str, labels: dict[str, str]) -> dict[int, float]:
        """A counter's sample (``name_total``) with ``labels``, as each process counted it, by pid.

        Read from the multiprocess files the processes write (``counter_<pid>.db``), which /metrics adds up:
        the one way to tell which worker served what without asking the workers.
        """
        counts: dict[int, float] = {}
        if self.metrics_dir is None:
            return counts
        for path in self.metrics_dir.glob("counter_*.db"):
            pid = int(path.stem.removeprefix("counter_"))
            for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(path)):
                _metric, name, found, _help = json.loads(key)
                if name == sample and found == labels:
                    counts[pid] = counts.get(pid, 0.0) + value
        return counts

    def _connection(self) -> http.client.HTTPConnection:
        if self.unix_path is not None:
            return UnixConnection(self.unix_path, timeout=10)
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def request(self, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = self._connection()
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data,
                               headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)


@contextlib.contextmanager
def live_service(env: dict[str, str], workdir: Path, *, workers: int = 4,
                 unix_socket: bool = False) -> Iterator[LiveService]:
    """Run ``attest-service serve --workers N`` with ``env`` added; stop it (and its workers) on exit.

    ``unix_socket`` binds a Unix socket instead of a loopback port: an address that is not loopback, without
    exposing anything to the network. It lives in a short temporary directory (a socket path has at most
    107 bytes, less than pytest's directories may need).
    """
    port = free_port()
    log = workdir / f"serve-{port}.log"
    metrics_dir = workdir / f"metrics-{port}"
    metrics_dir.mkdir()
    full_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env}
    unix_path = Path(tempfile.mkdtemp(prefix="attest-")) / "serve.sock" if unix_socket else None
    bind = f"unix:{unix_path}" if unix_path is not None else f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "attest_service", "serve", "--bind", bind, "--workers", str(workers)]
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=full_env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    service = LiveService(port, log, pid=process.pid, unix_path=unix_path, metrics_dir=metrics_dir)
    try:
        _wait_healthy(service, process)
        yield service
    finally:
        _stop(process)
        if unix_path is not None:
            shutil.rmtree(unix_path.parent, ignore_errors=True)


def _wait_healthy(service: LiveService, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{service.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if service.request("GET", "/healthz")[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"serve did not become healthy:\n{service.log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            # The session holds the master and its workers only; nothing else is in it.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
