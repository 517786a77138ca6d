"""Slow and hostile clients against ``attest-service serve``: does anyone else still get verified?

For each worker variant (the shipped gunicorn configuration, and the same with gevent workers when
gevent is installed), starts Redis and the service (2 workers) on loopback, then:

1. probes with valid verifications alone (5/s, each on a new connection, 5 s deadline);
2. opens 100 connections that send their body one byte a second, and probes again meanwhile;
3. floods hostile bodies (over 1 MiB announced and chunked, JSON nested 100 000 deep, 60 000 keys,
   random bytes) from 8 threads, printing the answers per kind and each worker's RSS before and after;
4. probes once more;
5. with ``--stalled N``: N connections from 50 loopback addresses each send all but the last byte of a body
   of the limit (1 MiB) and stall, twice; prints the answers and the master's and workers' resident memory
   before and at the peak of each flood (``ATTEST_BODY_TIMEOUT_SECONDS`` is set to ``--body-timeout``).

Run: ``python benchmarks/slow_clients.py [--variant shipped|gthread|all] [--slow 100] [--seconds 20]
[--stalled 400] [--body-timeout 3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.redis_server import redis_server  # noqa: E402
from tests.system.reliability.harness import (  # noqa: E402
    WORKER_VARIANTS,
    DocumentFactory,
    gunicorn_argv,
    running_service,
    service_env,
)
from tests.system.reliability.slow import run_slow_clients, stalled_flood  # noqa: E402


def run(variant: str, slow: int, seconds: float, stalled: int, body_timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="attest-slow-") as tmp:
        workdir = Path(tmp)
        factory = DocumentFactory(workdir / "pinned")
        with redis_server(workdir / "redis") as redis:
            env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url,
                              extra={"ATTEST_BODY_TIMEOUT_SECONDS": str(body_timeout)})
            with running_service(env, workdir, argv=gunicorn_argv(variant)) as service:
                report = run_slow_clients(service.port, service.worker_pids(), factory, variant=variant,
                                          slow_count=slow, attack_seconds=seconds)
                pids = [service.master_pid, *service.worker_pids()]
                floods = [stalled_flood(service.port, pids, count=stalled, sources=50, seconds=body_timeout + 3)
                          for _ in range(2 if stalled else 0)]
    print(f"== {variant}")
    print(f"alone:                    {report.baseline}")
    print(f"{slow} slow bodies (1 B/s): {report.under_attack}; slow connections dropped by the server: "
          f"{report.slow_dropped}")
    print("hostile bodies (answers):")
    for key, count in sorted(report.hostile.items()):
        print(f"    {key}: {count}")
    for pid, before in report.rss_before.items():
        after = report.rss_after.get(pid, 0)
        print(f"worker {pid} RSS: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after the flood "
              f"({(after - before) / 1024:+.1f} MiB)")
    print(f"after:                    {report.probe_after}")
    for index, flood in enumerate(floods, 1):
        print(f"stalled flood {index} ({stalled} bodies of 1 MiB less a byte): answers {dict(flood.answers)}")
        for pid, before in flood.rss_before.items():
            peak = flood.rss_peak[pid]
            print(f"    pid {pid} RSS: {before / 1024:.1f} MiB before, {peak / 1024:.1f} MiB at the peak")
        print(f"    master and workers at their peaks: {flood.peak_total_kib / 1024:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=[*WORKER_VARIANTS, "all"], default="all")
    parser.add_argument("--slow", type=int, default=100, help="slow connections (default 100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the slow attack (default 20)")
    parser.add_argument("--stalled", type=int, default=0, help="stalled near-limit bodies per flood (default 0)")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="ATTEST_BODY_TIMEOUT_SECONDS (default 10)")
    args = parser.parse_args()
    variants = list(WORKER_VARIANTS) if args.variant == "all" else [args.variant]
    for variant in variants:
        run(variant, args.slow, args.seconds, args.stalled, args.body_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
