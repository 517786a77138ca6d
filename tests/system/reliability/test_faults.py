"""Faults under load, bounded: every phase of :mod:`tests.system.reliability.faults`, then one test per invariant.

Each worker variant (the shipped gunicorn configuration; the same with gevent workers when gevent is
installed) gets one run of about 70 seconds (short phases, Redis frozen 3 s); ``python benchmarks/faults.py``
is the full-length version. The rate is half the capacity measured at the start of each run.
"""

from __future__ import annotations

import pytest

from tests.system.reliability.conftest import requires_redis
from tests.system.reliability.faults import RECOVERY_BOUND_SECONDS, FaultReport, FaultSettings, run_faults

pytestmark = [pytest.mark.slow, requires_redis]


def _settings(variant: str) -> FaultSettings:
    return FaultSettings(phase_seconds=6.0, freeze_seconds=3.0, capacity_seconds=4.0, trust_reload_seconds=1.0,
                         variant=variant)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> FaultReport:
    variant = "shipped"
    result = run_faults(tmp_path_factory.mktemp(f"faults-{variant}"), _settings(variant), say=lambda _line: None)
    print(f"\n{variant}: rate {result.rate:.0f}/s (capacity {result.capacity or 0:.0f}/s)\n{result.table}")
    return result


def test_load_reached_every_phase(report: FaultReport) -> None:
    phases = {shot.phase for shot in report.shots}
    assert {"baseline", "redis-restart", "redis-frozen", "worker-kill", "pins-garbage", "pins-restored"} <= phases


def test_every_accepted_nonce_is_recorded_in_redis(report: FaultReport) -> None:
    assert not report.violations.unrecorded


def test_no_nonce_is_accepted_twice(report: FaultReport) -> None:
    assert not report.violations.accepted_twice


def test_the_only_server_error_is_503_store_unavailable(report: FaultReport) -> None:
    assert not report.violations.bad_statuses


def test_every_request_gets_its_kind_of_answer(report: FaultReport) -> None:
    # Replays 409, tampered 422, non-JSON 400, valid 200, whatever the fault (503 aside).
    assert not report.violations.wrong_outcomes


def test_store_outage_is_refused_with_503(report: FaultReport) -> None:
    down = [shot for shot in report.shots if shot.phase in {"redis-restart", "redis-frozen"}]
    assert any(shot.status == 503 for shot in down)


def test_every_503_comes_within_the_store_timeout(report: FaultReport) -> None:
    assert not report.violations.slow_503


def test_valid_documents_are_accepted_while_the_pins_are_garbage(report: FaultReport) -> None:
    # A failed reload keeps the last good trust.
    during = [shot for shot in report.shots if shot.phase == "pins-garbage" and shot.kind == "valid"]
    assert during
    assert all(shot.status == 200 for shot in during)


def test_a_killed_worker_breaks_only_its_own_connections(report: FaultReport) -> None:
    broken = [shot for shot in report.shots if shot.status == 0]
    assert {shot.phase for shot in broken} <= {"worker-kill"}
    assert len(broken) <= _settings(report.variant).threads


@pytest.mark.parametrize("fault", ["redis-restart", "redis-frozen", "worker-kill", "pins-garbage"])
def test_full_service_returns_within_seconds_without_restart(report: FaultReport, fault: str) -> None:
    recovered = report.recovery_seconds[fault]
    assert recovered is not None
    assert recovered <= RECOVERY_BOUND_SECONDS
    late = report.late_after_recovery[fault]
    since = report.fault_ends[fault]
    assert not late, [(round(shot.sent - since, 2), shot.phase, shot.status, shot.code) for shot in late[:10]]
