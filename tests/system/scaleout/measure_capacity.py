"""Sizing figures of ``POST /v1/verify``: throughput, latency, CPU per verification, Redis work, memory.

Runs ``attest-service serve --workers N`` on a real Redis, drives it with distinct valid documents from a
keep-alive Python client (closed loop for capacity, then paced at half of it for latency), and reads the CPU
time the gunicorn workers and redis-server spent from ``/proc``. CPU per verification is the figure to size
with: unlike requests per second, it does not depend on what else the machine is running. Prints figures;
asserts nothing. Linux only (``/proc``).

Run: ``python -m tests.system.scaleout.measure_capacity [--workers N] [--documents N] [--duration S]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from tests.support.redis_server import redis_server
from tests.support.service import DocumentFactory, ServiceProcess, running_service
from tests.system.scaleout import properties

CONNECTIONS: Final = 8
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the gunicorn workers of a master)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def load(service: ServiceProcess, bodies: Iterator[bytes], *, duration: float,
         interval: float | None = None) -> tuple[int, int, list[float]]:
    """Send bodies for ``duration`` s over :data:`CONNECTIONS` connections, back to back or paced per connection.

    Returns (answers, non-200 answers, latencies in ms counted from each request's scheduled time).
    """
    lock = threading.Lock()
    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + duration

    def run(offset: int) -> None:
        connection = http.client.HTTPConnection(service.host, service.port, timeout=30)
        scheduled = time.monotonic() + (offset * interval / CONNECTIONS if interval else 0)
        while scheduled < stop:
            if interval:
                time.sleep(max(0.0, scheduled - time.monotonic()))
            else:
                scheduled = time.monotonic()
            with lock:
                body = next(bodies, None)
            if body is None:
                return
            connection.request("POST", "/v1/verify", body=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {properties.KEYS['replay']}"})
            response = connection.getresponse()
            response.read()
            with lock:
                latencies.append((time.monotonic() - scheduled) * 1000)
                failures[0] += response.status != 200
            if interval:
                scheduled += interval
        connection.close()

    threads = [threading.Thread(target=run, args=(offset,)) for offset in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies), failures[0], latencies


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--documents", type=int, default=6000)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capacity-") as name, redis_server(Path(name) / "redis") as redis:
        workdir = Path(name)
        factory = DocumentFactory.around_now(workdir / "pinned")
        started = time.monotonic()
        documents = [json.dumps(factory.verify_body(f"cap-{index:08d}")).encode() for index in range(args.documents)]
        print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, workers {args.workers}, "
              f"{len(documents)} documents signed in {time.monotonic() - started:.1f} s")
        env = properties.service_env(redis.url, factory.pinned_dir, workdir,
                                     rate_limit_per_minute=properties.GENEROUS_RATE_LIMIT)
        with running_service(env, workdir, workers=args.workers) as service:
            feed = iter(documents)
            warm, _, _ = load(service, feed, duration=1.0)  # warm-up: imports, script loading, connection pools
            assert service.pid is not None
            master = service.pid
            workers = children(master)
            client = redis.client()
            client.config_resetstat()
            redis_pid = int(client.info("server")["process_id"])
            cpu_before = sum(cpu_seconds(pid) for pid in workers)
            redis_before = cpu_seconds(redis_pid)
            wall = time.monotonic()
            done, failed, latencies = load(service, feed, duration=args.duration)
            wall = time.monotonic() - wall
            worker_cpu = sum(cpu_seconds(pid) for pid in workers) - cpu_before
            redis_cpu = cpu_seconds(redis_pid) - redis_before
            evalsha = int(client.info("commandstats")["cmdstat_evalsha"]["calls"])
            rate = done / wall
            print(f"capacity: {rate:.0f} verifications/s ({CONNECTIONS} connections, non-200 {failed}), "
                  f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms")
            print(f"service CPU per verification: {worker_cpu / done * 1000:.2f} ms "
                  f"(= {done / worker_cpu:.0f} verifications/s per fully used core); "
                  f"workers used {worker_cpu / wall:.2f} cores")
            print(f"redis CPU per verification: {redis_cpu / done * 1000:.3f} ms; "
                  f"EVALSHA per verification: {evalsha / done:.2f}")
            half = rate / 2
            # Each request needs a document nobody verified yet; stop the paced run before they run out.
            paced_seconds = min(args.duration, (len(documents) - warm - done) / half * 0.95)
            done, failed, latencies = load(service, feed, duration=paced_seconds, interval=CONNECTIONS / half)
            print(f"at {half:.0f} verifications/s offered (paced, {paced_seconds:.1f} s): "
                  f"{done / paced_seconds:.0f}/s answered, "
                  f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
                  f"non-200 {failed}")
            rss = [rss_bytes(pid) for pid in workers]
            print(f"RSS: master {rss_bytes(master) / 2**20:.0f} MiB, workers "
                  + ", ".join(f"{value / 2**20:.0f} MiB" for value in rss))
            client.close()


if __name__ == "__main__":
    main()
