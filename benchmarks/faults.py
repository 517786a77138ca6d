"""Faults under load against real processes: Redis restarted and frozen, a worker killed, pins garbled.

Starts a durable redis-server and ``attest-service serve`` (gunicorn, 2 workers, Redis store, store timeout
0.5 s) on loopback, measures capacity, then keeps a paced load at half of it through each fault (see
``tests/system/reliability/faults.py`` for the phases and the invariants). Prints counts per status and code for
each phase, latency percentiles, the recovery time after each fault and every broken invariant; exits 1
when an invariant broke.

Run: ``python benchmarks/faults.py [--phase-seconds 20] [--freeze-seconds 10] [--rate R] [--variant gthread]``
(needs redis-server; the gthread variant runs the threaded workers shipped before, for comparison).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.system.reliability.faults import RECOVERY_BOUND_SECONDS, FaultSettings, run_faults  # noqa: E402
from tests.system.reliability.harness import WORKER_VARIANTS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--freeze-seconds", type=float, default=10.0, help="how long Redis is frozen (default 10)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: half the measured capacity)")
    parser.add_argument("--variant", choices=list(WORKER_VARIANTS), default="shipped",
                        help="gunicorn workers: the shipped configuration, or it with gevent workers")
    parser.add_argument("--store-timeout", type=float, default=0.5, help="ATTEST_STORE_TIMEOUT_SECONDS (default 0.5)")
    args = parser.parse_args()
    settings = FaultSettings(phase_seconds=args.phase_seconds, freeze_seconds=args.freeze_seconds, rate=args.rate,
                             store_timeout=args.store_timeout, variant=args.variant)
    with tempfile.TemporaryDirectory(prefix="attest-faults-") as tmp:
        report = run_faults(Path(tmp), settings)
    print()
    print(report.table)
    print()
    for name, seconds in report.recovery_seconds.items():
        recovered = "never" if seconds is None else f"{seconds:.2f} s"
        print(f"{name:<16} first 200 after the fault ended: {recovered}; requests not served normally "
              f"{RECOVERY_BOUND_SECONDS:.0f} s or more after it: {len(report.late_after_recovery[name])}")
    served_503 = sorted(shot.latency for shot in report.shots if shot.status == 503)
    if served_503:
        print(f"503 store_unavailable: {len(served_503)}, latency max {served_503[-1] * 1000:.0f} ms "
              f"(bound: store timeout {settings.store_timeout} s + margin)")
    worker_kill_errors = [shot for shot in report.shots if shot.status == 0 and shot.phase == "worker-kill"]
    print(f"connections broken by the SIGKILLed worker {report.killed_worker}: {len(worker_kill_errors)}")
    print(f"invariants: {'all held' if report.violations.ok() else report.violations.describe()}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
