"""HTTP throughput and latency of POST /v1/verify against a bare Flask echo under the same gunicorn settings.

Both servers run the service's gunicorn configuration with 2 workers; the service uses a real Redis store.
Every request carries a distinct valid document (distinct nonces), so each one is a full verification plus
two store round trips (rate counter, nonce). With ``wrk`` installed, capacity is wrk's closed-loop rate over
16 keep-alive connections, and latency at about half capacity is wrk's again with a pause between requests
on each connection. Without wrk, a Python keep-alive client measures capacity and a paced Python client the
latency, counted from each request's scheduled send time (so queueing is not hidden); on a small machine
that client competes with the servers for CPU, which inflates its figures. Prints figures; asserts nothing.

Run: ``python benchmarks/bench_http.py [--documents N] [--duration S]`` (needs redis-server).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from attest_service.imds import pki  # noqa: E402
from attest_service.web import gunicorn_conf  # noqa: E402
from tests.support.redis_server import free_port, redis_server  # noqa: E402

WORKERS = 2
PATH = "/v1/verify"
HEALTH_TIMEOUT_SECONDS = 30.0
WRK_THREADS = 2
WRK_CONNECTIONS = 16
PACED_THREADS = 8

_WRK_SCRIPT = """
local bodies = {}
local position = 0
local step = %(threads)d
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  for line in io.lines("%(bodies)s") do bodies[#bodies + 1] = line end
  position = id
end
function delay()
  return %(delay_ms)d
end
function request()
  local body = bodies[(position %% #bodies) + 1]
  position = position + step
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, body)
end
"""


def create_echo_app():
    """A bare Flask app answering POST /v1/verify by parsing the JSON body and echoing its size."""
    from flask import Flask, jsonify, request  # noqa: PLC0415

    app = Flask("echo")

    @app.post(PATH)
    def echo():
        body = json.loads(request.get_data())
        return jsonify({"verified": True, "size": len(body.get("signature", ""))})

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    return app


def make_documents(count: int, pinned: Path) -> list[bytes]:
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    bodies = []
    for index in range(count):
        content = pki.attested_content(
            nonce=f"bench{index:06d}{uuid.uuid4().hex[:8]}", vm_id=str(uuid.uuid4()),
            subscription_id="8a205152-0000-4000-8000-000000000001", sku="20_04-lts-gen2",
            plan=("", "", ""), license_type="", created_on=now - timedelta(seconds=30),
            expires_on=now + pki.DOCUMENT_LIFETIME)
        signature = base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()
        bodies.append(json.dumps({"document": {"encoding": "pkcs7", "signature": signature}}).encode())
    return bodies


@contextlib.contextmanager
def server(argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.1)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _milliseconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk_run(port: int, bodies: list[bytes], duration: float, workdir: Path,
            delay_ms: int = 0) -> tuple[float, float, float, int]:
    """Run wrk; with ``delay_ms`` each connection waits that long between requests (to hold a lower load).

    Returns requests per second, p50 and p99 latency in milliseconds, and the count of non-2xx answers.
    """
    body_file = workdir / f"bodies-{port}-{delay_ms}.txt"
    body_file.write_bytes(b"\n".join(bodies) + b"\n")
    script = workdir / f"script-{port}-{delay_ms}.lua"
    script.write_text(_WRK_SCRIPT % {"threads": WRK_THREADS, "bodies": body_file, "path": PATH,
                                     "delay_ms": delay_ms})
    result = subprocess.run(
        ["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{int(duration)}s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", result.stdout)
    p50 = re.search(r"\s50%\s+(\S+)", result.stdout)
    p99 = re.search(r"\s99%\s+(\S+)", result.stdout)
    return (float(rate.group(1)) if rate else 0.0, _milliseconds(p50.group(1)) if p50 else float("nan"),
            _milliseconds(p99.group(1)) if p99 else float("nan"), int(errors.group(1)) if errors else 0)


def python_rate(port: int, bodies: list[bytes], duration: float) -> tuple[float, str]:
    """Closed-loop keep-alive client: as many requests as it can for ``duration`` seconds."""
    feed = iter(bodies)
    lock = threading.Lock()
    done = [0, 0]
    stop = time.monotonic() + duration

    def run() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            with lock:
                body = next(feed, None)
            if body is None:
                return
            connection.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            with lock:
                done[0] += 1
                done[1] += response.status >= 300
        connection.close()

    threads = [threading.Thread(target=run) for _ in range(WRK_CONNECTIONS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.monotonic() - started), f"non-2xx: {done[1]}"


def paced_latency(port: int, bodies: list[bytes], rate: float, duration: float) -> tuple[list[float], int]:
    """Send at ``rate`` requests/s; latency counts from each request's scheduled time (milliseconds)."""
    total = min(len(bodies), int(rate * duration))
    interval = PACED_THREADS / rate
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def run(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for number, index in enumerate(range(offset, total, PACED_THREADS)):
            scheduled = start + (offset / PACED_THREADS + number) * interval
            delay = scheduled - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            connection.request("POST", PATH, body=bodies[index], headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            elapsed = (time.monotonic() - scheduled) * 1000
            with lock:
                latencies.append(elapsed)
                failures[0] += response.status >= 300
        connection.close()

    threads = [threading.Thread(target=run, args=(offset,)) for offset in range(PACED_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(name: str, port: int, bodies: list[bytes], duration: float, workdir: Path) -> tuple[float, float]:
    """Capacity, then latency at about half of it; returns (capacity, p99 at half capacity in ms)."""
    # wrk's threads each walk their own share of the bodies; they run at slightly different speeds, so
    # the capacity run gets most of them to keep every request a first submission.
    split = len(bodies) * 7 // 10
    if shutil.which("wrk") is None:
        rate, note = python_rate(port, bodies[:split], duration)
        latencies, failures = paced_latency(port, bodies[split:], rate / 2, duration)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"{name:8s} capacity {rate:8.0f} req/s (python client, {note}); at {rate / 2:.0f} req/s (paced): "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, non-2xx {failures}")
        return rate, p99
    rate, full_p50, full_p99, errors = wrk_run(port, bodies[:split], duration, workdir)
    # Each connection pauses between requests so that together they offer about half the capacity.
    delay_ms = max(1, round(WRK_CONNECTIONS / (rate / 2) * 1000))
    half_rate, p50, p99, half_errors = wrk_run(port, bodies[split:], duration, workdir, delay_ms)
    print(f"{name:8s} capacity {rate:8.0f} req/s (wrk -c {WRK_CONNECTIONS}: p50 {full_p50:.2f} ms, "
          f"p99 {full_p99:.2f} ms, non-2xx {errors}); at {half_rate:.0f} req/s ({delay_ms} ms think time): "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, non-2xx {half_errors}")
    return rate, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=8000, help="distinct documents to generate")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, gunicorn workers: {WORKERS} ({gunicorn_conf.worker_class}), "
          f"documents: {args.documents}")

    with tempfile.TemporaryDirectory(prefix="bench-http-") as name, redis_server(Path(name) / "redis") as redis:
        workdir = Path(name)
        started = time.monotonic()
        bodies = make_documents(args.documents, workdir / "pinned")
        print(f"generated {len(bodies)} documents in {time.monotonic() - started:.1f} s")
        common = {"PROMETHEUS_MULTIPROC_DIR": "", "ATTEST_LOG_LEVEL": "warning"}

        service_port = free_port()
        metrics_dir = workdir / "metrics"
        metrics_dir.mkdir()
        service_env = {**common, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                       "ATTEST_PINNED_CERTS": str(workdir / "pinned"), "ATTEST_NONCE_STORE": redis.url,
                       "ATTEST_RATE_LIMIT_PER_MINUTE": "1000000"}
        argv = [sys.executable, "-m", "attest_service", "serve", "--bind", f"127.0.0.1:{service_port}",
                "--workers", str(WORKERS)]
        with server(argv, service_env, service_port, workdir / "service.log"):
            verify_rate, verify_p99 = measure("verify", service_port, bodies, args.duration, workdir)

        echo_port = free_port()
        echo_argv = [sys.executable, "-m", "gunicorn", "--config", "python:attest_service.web.gunicorn_conf",
                     "--bind", f"127.0.0.1:{echo_port}", "--workers", str(WORKERS),
                     "--pythonpath", str(Path(__file__).parent), "bench_http:create_echo_app()"]
        with server(echo_argv, {**common, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, echo_port,
                    workdir / "echo.log"):
            echo_rate, _ = measure("echo", echo_port, bodies, args.duration, workdir)

    print(f"ratio verify/echo: {verify_rate / echo_rate:.2f} (target >= 0.6); "
          f"verify p99 at half capacity: {verify_p99:.2f} ms (target < 10 ms)")


if __name__ == "__main__":
    main()
