"""Soak: a steady load at half capacity for a long time; per-interval latency, statuses and worker RSS.

Starts a redis-server and ``attest-service serve`` (2 workers, Redis store) on loopback, measures capacity
(closed loop, 16 connections), then sends a paced mix at half of it: valid first uses (75 %), replays of
accepted nonces (10 %, must get 409), tampered signatures (10 %, 422) and non-JSON bodies (5 %, 400).
Every interval it prints the requests sent, the answers per status, latency percentiles and each worker's
resident memory. At the end: RSS growth per worker after the warm-up, the count of 5xx (must be 0) and of
nonces accepted twice (must be 0). Exits 1 when either is not 0.

Run: ``DURATION=1800 INTERVAL=60 python benchmarks/soak.py`` (defaults: 1800 s, 60 s; ``WARMUP`` defaults to
a fifth of the duration, at most 300 s; ``RATE`` overrides the half-capacity rate).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.redis_server import redis_server  # noqa: E402
from tests.system.reliability.harness import (  # noqa: E402
    DocumentFactory,
    Load,
    closed_loop_capacity,
    percentile,
    rss_kib,
    running_service,
    service_env,
)

DURATION_SECONDS = float(os.environ.get("DURATION", "1800"))
INTERVAL_SECONDS = float(os.environ.get("INTERVAL", "60"))
WARMUP_SECONDS = float(os.environ.get("WARMUP", str(min(300.0, DURATION_SECONDS / 5))))
CAPACITY_SECONDS = 8.0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="attest-soak-") as tmp:
        workdir = Path(tmp)
        factory = DocumentFactory(workdir / "pinned")
        with redis_server(workdir / "redis") as redis:
            env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url)
            with running_service(env, workdir, workers=2) as service:
                capacity = closed_loop_capacity(service.port, factory, seconds=CAPACITY_SECONDS)
                rate = float(os.environ.get("RATE", "0")) or capacity / 2
                print(f"capacity {capacity:.0f}/s; soak at {rate:.0f}/s for {DURATION_SECONDS:.0f} s "
                      f"(warm-up {WARMUP_SECONDS:.0f} s, interval {INTERVAL_SECONDS:.0f} s)", flush=True)
                print(f"{'t s':>6} {'sent':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}  "
                      f"{'worker RSS MiB':<22} statuses", flush=True)
                samples: list[tuple[float, dict[int, int]]] = []
                started = time.monotonic()
                seen = 0
                with Load(service.port, factory, rate, threads=32) as load:
                    while (elapsed := time.monotonic() - started) < DURATION_SECONDS:
                        time.sleep(min(INTERVAL_SECONDS, DURATION_SECONDS - elapsed))
                        shots = load.shots[seen:]
                        seen += len(shots)
                        rss = {pid: rss_kib(pid) for pid in service.worker_pids()}
                        elapsed = time.monotonic() - started
                        samples.append((elapsed, rss))
                        latencies = [shot.latency * 1000 for shot in shots]
                        statuses = Counter(shot.status for shot in shots)
                        rss_text = " ".join(f"{value / 1024:.1f}" for value in rss.values())
                        print(f"{elapsed:>6.0f} {len(shots):>6} {percentile(latencies, 0.5):>7.1f} "
                              f"{percentile(latencies, 0.95):>7.1f} {percentile(latencies, 0.99):>7.1f} "
                              f"{max(latencies, default=0):>7.1f}  {rss_text:<22} "
                              f"{dict(sorted(statuses.items()))}", flush=True)
                all_shots = list(load.shots)
    server_errors = sum(1 for shot in all_shots if shot.status == 0 or shot.status >= 500)
    accepted = Counter(shot.nonce for shot in all_shots if shot.status == 200 and shot.nonce)
    twice = sum(1 for count in accepted.values() if count > 1)
    latencies = [shot.latency * 1000 for shot in all_shots]
    statuses = dict(sorted(Counter(shot.status for shot in all_shots).items()))
    print(f"\ntotal {len(all_shots)} requests; p50 {percentile(latencies, 0.5):.1f} ms, "
          f"p99 {percentile(latencies, 0.99):.1f} ms; statuses {statuses}")
    after_warmup = [sample for sample in samples if sample[0] >= WARMUP_SECONDS]
    if len(after_warmup) >= 2:
        (first_t, first), (last_t, last) = after_warmup[0], after_warmup[-1]
        for pid in first:
            if pid in last:
                growth = (last[pid] - first[pid]) / 1024
                print(f"worker {pid}: RSS {first[pid] / 1024:.1f} MiB at {first_t:.0f} s -> {last[pid] / 1024:.1f} "
                      f"MiB at {last_t:.0f} s ({growth:+.1f} MiB)")
            else:
                print(f"worker {pid} was replaced during the soak")
    print(f"5xx or unanswered: {server_errors}; nonces accepted twice: {twice}")
    return 0 if server_errors == 0 and twice == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
