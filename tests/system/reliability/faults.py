"""Faults under load: the nonce store restarted and frozen, a worker killed, the pins replaced with garbage.

A real ``redis-server`` (durable: appendfsync always) and ``attest-service serve`` (gunicorn, 2 workers,
Redis store, a short store timeout) run on loopback. A paced load of valid first uses, replays, tampered
documents and non-JSON bodies runs at about half the measured capacity through these phases:

1. ``baseline``        nothing wrong;
2. ``redis-restart``   Redis stopped for a moment, then started again (same port, data kept);
3. ``redis-frozen``    Redis suspended with SIGSTOP for ``freeze_seconds``, then resumed with SIGCONT;
4. ``after-freeze``    recovery;
5. ``worker-kill``     one gunicorn worker killed with SIGKILL (the master starts another);
6. ``pins-garbage``    the pinned directory replaced by unusable files for longer than the reload period;
7. ``pins-restored``   the good directory put back.

Afterwards :func:`tests.system.reliability.harness.check_invariants` asks Redis whether every nonce answered 200
is recorded, and checks that no nonce got 200 twice, that the only 5xx is 503 store_unavailable, and that
every 503 came back within the store timeout plus a margin. The time from the end of each fault to the
first 200 is reported as its recovery time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from attest_service.nonces.redis.keys import seen_key
from tests.support.redis_server import redis_server
from tests.system.reliability.harness import (
    DURABLE_REDIS_ARGS,
    DocumentFactory,
    Load,
    Shot,
    Violations,
    check_invariants,
    closed_loop_capacity,
    gunicorn_argv,
    phase_table,
    replace_with_garbage,
    restore,
    running_service,
    service_env,
    wait_for,
)

PHASES: Final = ["warm-up", "baseline", "redis-restart", "redis-frozen", "after-freeze", "worker-kill",
                 "pins-garbage", "pins-restored"]
#: Seconds Redis stays stopped in the restart phase (clients see "connection refused" meanwhile).
REDIS_DOWN_SECONDS: Final = 2.0
#: Allowed lateness of a 503 beyond the store timeout, in seconds: the rest of the request's work and
#: scheduling on a loaded two-core machine. A hung request would exceed it by the client timeout.
MARGIN_503_SECONDS: Final = 0.5
#: Seconds between labelling a new phase and injecting its fault, so that requests sent under the previous
#: label have been answered and each answer is counted in the phase that caused it.
FAULT_LEAD_SECONDS: Final = 1.0
#: After a fault ends, seconds within which every request must be served normally again.
RECOVERY_BOUND_SECONDS: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultSettings:
    """Durations and rates of one fault run."""

    phase_seconds: float = 20.0
    freeze_seconds: float = 10.0
    capacity_seconds: float = 8.0
    rate: float | None = None  # requests per second; None: half the measured capacity
    store_timeout: float = 0.5
    trust_reload_seconds: float = 2.0
    threads: int = 48
    variant: str = "shipped"  # a key of WORKER_VARIANTS


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultReport:
    """What a fault run measured."""

    variant: str
    capacity: float | None
    rate: float
    shots: list[Shot]
    fault_ends: dict[str, float]  # phase -> time.monotonic() when its fault was removed
    recovery_seconds: dict[str, float | None]
    violations: Violations
    late_after_recovery: dict[str, list[Shot]]  # fault -> requests not served normally past the recovery bound
    killed_worker: int
    table: str

    def ok(self) -> bool:
        """Whether every invariant held and every fault recovered within the bound."""
        return self.violations.ok() and not any(self.late_after_recovery.values()) and all(
            value is not None and value <= RECOVERY_BOUND_SECONDS for value in self.recovery_seconds.values())


def _recovery(shots: list[Shot], since: float) -> float | None:
    served = [shot.sent + shot.latency for shot in shots if shot.sent >= since and shot.status == 200]
    return min(served) - since if served else None


def _late(shots: list[Shot], since: float, until: float) -> list[Shot]:
    # From the recovery bound on, every request must get its kind's normal answer (no 503, no missing answer).
    return [shot for shot in shots if since + RECOVERY_BOUND_SECONDS <= shot.sent < until
            and (shot.status == 0 or shot.status >= 500)]


def run_faults(workdir: Path, settings: FaultSettings, say: Callable[[str], None] = print) -> FaultReport:
    """Run every phase against fresh processes in ``workdir``; return the measurements."""
    factory = DocumentFactory(workdir / "pinned")
    fault_ends: dict[str, float] = {}
    fault_starts: dict[str, float] = {}
    with redis_server(workdir / "redis", extra_args=DURABLE_REDIS_ARGS) as redis:
        env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url, store_timeout=settings.store_timeout,
                          trust_reload_seconds=settings.trust_reload_seconds)
        with running_service(env, workdir, workers=2, argv=gunicorn_argv(settings.variant)) as service:
            capacity = None
            rate = settings.rate
            if rate is None:
                capacity = closed_loop_capacity(service.port, factory, seconds=settings.capacity_seconds)
                rate = max(5.0, capacity / 2)
                say(f"capacity: {capacity:.0f} verifications/s (closed loop, 16 connections); load: {rate:.0f}/s")
            load = Load(service.port, factory, rate, threads=settings.threads)
            with load:
                time.sleep(2)
                load.phase = "baseline"
                time.sleep(settings.phase_seconds)

                load.phase = "redis-restart"
                time.sleep(FAULT_LEAD_SECONDS)
                say("redis: stop")
                fault_starts["redis-restart"] = time.monotonic()
                redis.stop()
                time.sleep(REDIS_DOWN_SECONDS)
                redis.start()
                fault_ends["redis-restart"] = time.monotonic()
                say("redis: started again")
                time.sleep(settings.phase_seconds)

                load.phase = "redis-frozen"
                time.sleep(FAULT_LEAD_SECONDS)
                say(f"redis: SIGSTOP for {settings.freeze_seconds:.0f} s")
                fault_starts["redis-frozen"] = time.monotonic()
                redis.freeze()
                time.sleep(settings.freeze_seconds)
                redis.thaw()
                fault_ends["redis-frozen"] = time.monotonic()
                say("redis: SIGCONT")
                load.phase = "after-freeze"
                time.sleep(settings.phase_seconds)

                load.phase = "worker-kill"
                time.sleep(FAULT_LEAD_SECONDS)
                killed = service.worker_pids()[0]
                say(f"gunicorn: SIGKILL worker {killed}")
                fault_starts["worker-kill"] = time.monotonic()
                os.kill(killed, signal.SIGKILL)
                fault_ends["worker-kill"] = time.monotonic()
                wait_for(lambda: len(service.worker_pids()) == 2 and killed not in service.worker_pids(), 30)
                time.sleep(settings.phase_seconds)

                load.phase = "pins-garbage"
                time.sleep(FAULT_LEAD_SECONDS)
                say("pins: replaced with garbage")
                fault_starts["pins-garbage"] = time.monotonic()
                backup = replace_with_garbage(factory.pinned_dir)
                time.sleep(max(settings.phase_seconds, 3 * settings.trust_reload_seconds))
                restore(factory.pinned_dir, backup)
                fault_ends["pins-garbage"] = time.monotonic()
                say("pins: restored")
                load.phase = "pins-restored"
                time.sleep(max(settings.phase_seconds, 3 * settings.trust_reload_seconds))
            end = time.monotonic()

        shots = list(load.shots)
        client = redis.client()
        try:
            accepted = sorted({shot.nonce for shot in shots if shot.status == 200 and shot.nonce})
            pipe = client.pipeline(transaction=False)
            for nonce in accepted:
                pipe.exists(seen_key(nonce))
            present = {nonce for nonce, found in zip(accepted, pipe.execute(), strict=True) if found}
        finally:
            client.close()

    violations = check_invariants(shots, recorded=present.__contains__,
                                  max_503_seconds=settings.store_timeout + MARGIN_503_SECONDS,
                                  disconnect_phases=frozenset({"worker-kill"}))
    ordered = sorted(fault_ends, key=fault_ends.__getitem__)
    recovery = {name: _recovery(shots, fault_ends[name]) for name in ordered}
    # Each fault's recovery window runs from its end to the labelling of the next fault's phase (the lead
    # before its injection), or to the end of the run; requests sent later may meet the next fault.
    late = {name: _late(shots, fault_ends[name],
                        fault_starts[ordered[index + 1]] - FAULT_LEAD_SECONDS if index + 1 < len(ordered) else end)
            for index, name in enumerate(ordered)}
    return FaultReport(variant=settings.variant, capacity=capacity, rate=rate, shots=shots, fault_ends=fault_ends,
                       recovery_seconds=recovery, violations=violations, late_after_recovery=late,
                       killed_worker=killed, table=phase_table(shots, PHASES))
