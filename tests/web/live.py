"""A real ``attest-service serve`` (gunicorn) process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.redis_server import free_port

#: Seconds the service may take until /healthz answers (workers import Flask and load the pins).
STARTUP_TIMEOUT_SECONDS = 20.0
#: Seconds gunicorn gets to stop after SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_SECONDS = 25.0

class LiveService:
    """The running service: its address and a way to send JSON requests."""

    def __init__(self, port: int, log: Path) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.log = log

    def request(self, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            data = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=data,
                               headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
        status, _, data = self.request(method, path, body)
        return status, json.loads(data)


@contextlib.contextmanager
def live_service(env: dict[str, str], workdir: Path, *, workers: int = 4) -> Iterator[LiveService]:
    """Run ``attest-service serve --workers N`` with ``env`` added; stop it (and its workers) on exit."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    metrics_dir = workdir / f"metrics-{port}"
    metrics_dir.mkdir()
    full_env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env}
    argv = [sys.executable, "-m", "attest_service", "serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=full_env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    service = LiveService(port, log)
    try:
        _wait_healthy(service, process)
        yield service
    finally:
        _stop(process)


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
