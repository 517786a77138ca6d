"""The embedded (SQLite) nonce store at capacity: does the default configuration answer 503 under load?

Runs ``attest-service serve`` exactly as a default install does (no ``ATTEST_NONCE_STORE``: the SQLite file
under ``$XDG_STATE_HOME``, the default store timeout, the default workers), drives ``POST /v1/verify`` with
``wrk`` in a closed loop (every request a distinct valid document), and counts the answers by code from the
service's own ``/metrics``. A 503 ``store_unavailable`` there means a worker waited longer than the store
timeout for SQLite's write lock, which another worker held while it committed. Prints figures per round and
the SQLite settings in force; asserts nothing.

The state directory must be on the disk the service would use (not a tmpfs), since the cost of a commit is
the disk's: ``--state-dir`` picks it (default: a temporary directory under ``$TMPDIR``).

Run: ``python benchmarks/bench_embedded_store.py [--rounds N] [--duration S] [--connections C]`` (needs wrk);
``--redis`` runs the same load on a local redis-server, to tell the store's share of the latency from the
machine's; ``--direct PAIRS`` measures the store alone (two processes, a rate count and a claim per pair).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import attest_service.nonces.sqlite_store as sqlite_store  # noqa: E402
from attest_service.errors import StoreUnavailable  # noqa: E402
from attest_service.nonces import DEFAULT_TIMEOUT_SECONDS, SQLiteNonceStore  # noqa: E402
from attest_service.server import gunicorn_conf  # noqa: E402
from tests.support.redis_server import redis_server  # noqa: E402
from tests.support.service import DocumentFactory, ServiceProcess  # noqa: E402

WRK_THREADS = 2
#: Requests per second the documents are signed for (more than the service answers on a small machine).
DOCUMENTS_PER_SECOND = 900

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
function request()
  local body = bodies[(position %% #bodies) + 1]
  position = position + step
  return wrk.format("POST", "/v1/verify", {["Content-Type"] = "application/json"}, body)
end
"""

_SAMPLE = re.compile(r'^attest_verifications_total\{code="([^"]*)",result="([^"]*)"\} ([0-9.e+]+)$', re.MULTILINE)


def answers_by_code(service: ServiceProcess) -> Counter[str]:
    """``attest_verifications_total`` by code (``none`` for a verified document), from ``/metrics``."""
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    counts: Counter[str] = Counter()
    for code, _result, value in _SAMPLE.findall(text):
        counts[code] += int(float(value))
    return counts


def sqlite_settings(path: Path) -> str:
    """The journal mode, synchronous level and busy timeout a store connection of this code base uses."""
    store = SQLiteNonceStore(path, timeout_seconds=DEFAULT_TIMEOUT_SECONDS)
    try:
        store.ping()
        connection = store._connection  # the pragmas the store set on its connection
        assert connection is not None
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        level = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[connection.execute("PRAGMA synchronous").fetchone()[0]]
        busy = connection.execute("PRAGMA busy_timeout").fetchone()[0]
    finally:
        store.close()
    return f"journal_mode={mode} synchronous={level} busy_timeout={busy} ms (SQLite {sqlite3.sqlite_version})"


def wrk(service: ServiceProcess, bodies: list[bytes], *, duration: int, connections: int, workdir: Path) -> str:
    """Run wrk once over ``bodies``; returns its report."""
    body_file = workdir / "bodies.txt"
    body_file.write_bytes(b"\n".join(bodies) + b"\n")
    script = workdir / "verify.lua"
    script.write_text(_WRK_SCRIPT % {"threads": WRK_THREADS, "bodies": body_file})
    result = subprocess.run(
        ["wrk", "-t", str(WRK_THREADS), "-c", str(connections), "-d", f"{duration}s", "--latency", "--timeout", "10s",
         "-s", str(script), service.url], capture_output=True, text=True, check=True)
    return result.stdout


def _direct_worker(path: str, index: int, pairs: int, synchronous: str,
                   results: multiprocessing.Queue[tuple[list[float], int]]) -> None:
    sqlite_store.SYNCHRONOUS = synchronous  # type: ignore[misc] - the level under comparison, in this process only
    store = SQLiteNonceStore(Path(path), timeout_seconds=DEFAULT_TIMEOUT_SECONDS)
    latencies, unavailable = [], 0
    for number in range(pairs):
        now = datetime.now(UTC)
        started = time.perf_counter()
        try:
            # What one verification asks of the store: count the request, then claim the nonce.
            store.hit_rate(f"client-{index}", limit=10**9, window_seconds=60, now=now)
            store.accept(f"direct-{index}-{number}", client_id=f"client-{index}",
                         expires_at=now + timedelta(hours=6), require_challenge=False, now=now)
        except StoreUnavailable:
            unavailable += 1  # the write lock was not free within the store timeout: a 503 in the service
        latencies.append(time.perf_counter() - started)
    store.close()
    results.put((latencies, unavailable))


def direct(workdir: Path, *, processes: int, pairs: int, synchronous: str) -> None:
    """The store alone: ``processes`` processes each make ``pairs`` (rate count, claim) pairs back to back."""
    path = workdir / "direct.sqlite3"
    print(f"store alone, synchronous={synchronous} (the store's own: {sqlite_store.SYNCHRONOUS})")
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[list[float], int]] = context.Queue()
    children = [context.Process(target=_direct_worker, args=(str(path), index, pairs, synchronous, results))
                for index in range(processes)]
    started = time.monotonic()
    for child in children:
        child.start()
    reports = [results.get() for _ in children]
    wall = time.monotonic() - started
    for child in children:
        child.join()
    latencies = sorted(value for report in reports for value in report[0])
    unavailable = sum(report[1] for report in reports)
    print(f"store alone, {processes} processes: {len(latencies) / wall:.0f} pairs/s; per pair p50 "
          f"{latencies[len(latencies) // 2] * 1000:.2f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms; store_unavailable {unavailable}")


def _field(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else "?"


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=20, help="seconds per round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--state-dir", type=Path, default=None, help="where the SQLite file goes (on disk)")
    parser.add_argument("--redis", action="store_true",
                        help="for comparison: the same load on a local redis-server instead of the embedded store")
    parser.add_argument("--direct", type=int, default=0, metavar="PAIRS",
                        help="instead of the service: two processes each making PAIRS store calls back to back")
    parser.add_argument("--synchronous", choices=("NORMAL", "FULL"), default=sqlite_store.SYNCHRONOUS,
                        help="with --direct: the SQLite synchronous level to measure")
    args = parser.parse_args()
    if shutil.which("wrk") is None and not args.direct:
        sys.exit("wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-embedded-", dir=args.state_dir) as name:
        workdir = Path(name)
        if args.direct:
            direct(workdir, processes=2, pairs=args.direct, synchronous=args.synchronous)
            return
        factory = DocumentFactory.around_now(workdir / "pinned")
        per_round = args.duration * DOCUMENTS_PER_SECOND
        started = time.monotonic()
        bodies = [json.dumps(factory.verify_body(f"emb-{index:09d}")).encode()
                  for index in range(per_round * args.rounds)]
        print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
              f"workers {gunicorn_conf.workers} ({gunicorn_conf.worker_class}), wrk -c {args.connections}; "
              f"{len(bodies)} documents signed in {time.monotonic() - started:.0f} s")
        state = workdir / "state"
        print(f"store: {state}/attest-service/nonces.sqlite3, timeout {DEFAULT_TIMEOUT_SECONDS} s, "
              + sqlite_settings(workdir / "probe.sqlite3"))
        # The defaults of an install: only the pins (generated here) and a rate limit out of the way.
        env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "XDG_STATE_HOME": str(state),
               "ATTEST_RATE_LIMIT_PER_MINUTE": "1000000", "ATTEST_LOG_LEVEL": "warning"}
        os.environ.pop("ATTEST_NONCE_STORE", None)  # the service inherits this environment
        with contextlib.ExitStack() as stack:
            if args.redis:
                env["ATTEST_NONCE_STORE"] = stack.enter_context(redis_server(workdir / "redis")).url
                print(f"store: {env['ATTEST_NONCE_STORE']} (comparison run)")
            service = stack.enter_context(ServiceProcess(env, workdir, workers=gunicorn_conf.workers))
            totals: Counter[str] = Counter()
            for index in range(args.rounds):
                before = answers_by_code(service)
                report = wrk(service, bodies[index * per_round:(index + 1) * per_round], duration=args.duration,
                             connections=args.connections, workdir=workdir)
                after = answers_by_code(service)
                answered = after - before
                totals += answered
                rate, p50 = _field(r"Requests/sec:\s+([\d.]+)", report), _field(r"\s50%\s+(\S+)", report)
                p99, slowest = _field(r"\s99%\s+(\S+)", report), _field(r"Latency\s+\S+\s+\S+\s+(\S+)", report)
                print(f"round {index + 1}: {rate} verifications/s, p50 {p50}, p99 {p99}, max {slowest}; "
                      f"answers {dict(sorted(answered.items()))}")
            verified = totals["none"]
            unavailable = totals["store_unavailable"]
            print(f"total: {verified} verified, {unavailable} store_unavailable (503), "
                  f"{sum(totals.values()) - verified - unavailable} other")


if __name__ == "__main__":
    main()
