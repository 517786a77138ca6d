"""Slow and hostile clients, bounded: 100 connections sending one body byte a second, then a hostile flood.

The shipped gunicorn configuration (gevent workers) is measured as shipped.
``python benchmarks/slow_clients.py`` is the longer version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from attest_service.web.body import MAX_BUFFERED_BYTES
from tests.support.redis_server import redis_server
from tests.system.reliability.conftest import requires_redis
from tests.system.reliability.harness import DocumentFactory, gunicorn_argv, running_service, service_env
from tests.system.reliability.slow import (
    SlowReport,
    StalledReport,
    hostile_flood,
    run_slow_clients,
    stalled_flood,
    workers_rss,
)

pytestmark = [pytest.mark.slow, requires_redis]

#: Share of probes that must be verified while the slow clients hold their connections.
SERVED_FRACTION = 0.95
#: Growth of a worker's resident memory over the hostile flood that still counts as bounded, in KiB:
#: a few 1 MiB bodies held at once per thread, and the allocator keeping what it once used.
RSS_GROWTH_BOUND_KIB = 64 * 1024
#: Growth over the last of two more floods equal to the first, in KiB: once the allocator holds what such a
#: flood needs, another one reuses it, so next to nothing (a leak per hostile request grows with their number).
RSS_REPEAT_GROWTH_BOUND_KIB = 8 * 1024
#: Slow-body connections opened for the attack.
SLOW_COUNT = 100
#: ATTEST_BODY_TIMEOUT_SECONDS of the slow-body experiment: well beyond its attack.
SLOW_BODY_TIMEOUT_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Run:
    """The experiment's report and the worker processes before and after it."""

    report: SlowReport
    workers_before: list[int]
    workers_after: list[int]
    #: The workers' resident memory after a second and a third hostile flood equal to the report's, in KiB.
    rss_after_second: dict[int, int]
    rss_after_third: dict[int, int]


def _run(variant: str, workdir: Path, *, hostile_seconds: float) -> Run:
    factory = DocumentFactory(workdir / "pinned")
    with redis_server(workdir / "redis") as redis:
        # The slow bodies must outlast the attack for the experiment to mean anything: a body timeout longer
        # than it (the flood below tests the timeout itself).
        env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url,
                          extra={"ATTEST_BODY_TIMEOUT_SECONDS": str(SLOW_BODY_TIMEOUT_SECONDS)})
        with running_service(env, workdir, argv=gunicorn_argv(variant)) as service:
            before = sorted(service.worker_pids())
            report = run_slow_clients(service.port, before, factory, variant=variant, slow_count=SLOW_COUNT,
                                      attack_seconds=6.0, probe_rate=5.0, hostile_seconds=hostile_seconds,
                                      probe_seconds=2.0)
            second = hostile_flood(service.port, hostile_seconds)
            rss_after_second = workers_rss(before)
            third = hostile_flood(service.port, hostile_seconds)
            rss_after_third = workers_rss(before)
            after = sorted(service.worker_pids())
    print(f"\n{variant}: alone {report.baseline}\n  under attack {report.under_attack}\n  after {report.probe_after}"
          f"\n  slow connections open at the end {report.slow_open_at_end}/{SLOW_COUNT}"
          f"\n  hostile {dict(report.hostile)}\n  RSS before {report.rss_before} after {report.rss_after}"
          f"\n  second hostile flood {dict(second)}: RSS after {rss_after_second}"
          f"\n  third hostile flood {dict(third)}: RSS after {rss_after_third}"
          f"\n  workers before {before} after {after}")
    return Run(report=report, workers_before=before, workers_after=after, rss_after_second=rss_after_second,
               rss_after_third=rss_after_third)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run("shipped", tmp_path_factory.mktemp("slow-shipped"), hostile_seconds=8.0)


@pytest.fixture(scope="module")
def shipped(run: Run) -> SlowReport:
    return run.report


def test_no_worker_crashed_or_was_replaced(run: Run) -> None:
    # A worker that died and was respawned would make every figure below meaningless (a dead pid's RSS is 0).
    assert run.workers_before
    assert run.workers_after == run.workers_before


def test_slow_connections_were_held_open_through_the_attack(shipped: SlowReport) -> None:
    # Otherwise the probes were served only because the server had dropped the slow clients.
    assert shipped.slow_dropped == 0
    assert shipped.slow_open_at_end == SLOW_COUNT


def test_slow_bodies_do_not_stop_others_with_the_shipped_workers(shipped: SlowReport) -> None:
    assert shipped.under_attack_fraction >= SERVED_FRACTION


def test_service_serves_again_once_slow_clients_leave(shipped: SlowReport) -> None:
    assert shipped.baseline_fraction == 1.0
    assert shipped.probe_after_fraction == 1.0


def test_hostile_bodies_get_only_4xx(shipped: SlowReport) -> None:
    assert shipped.hostile
    statuses = {key.rsplit(" ", 1)[1] for key in shipped.hostile}
    assert all(status.isdigit() and 400 <= int(status) < 500 for status in statuses), shipped.hostile


def test_bodies_over_one_mebibyte_get_413_when_announced(shipped: SlowReport) -> None:
    announced = {key for key in shipped.hostile if key.startswith("oversized ") and "chunked" not in key}
    assert announced == {"oversized 413"}


def test_bodies_over_one_mebibyte_get_413_when_chunked(shipped: SlowReport) -> None:
    assert {key for key in shipped.hostile if key.startswith("oversized chunked")} == {"oversized chunked 413"}


def test_hostile_bodies_leave_worker_memory_bounded(run: Run) -> None:
    shipped = run.report
    assert shipped.rss_before
    for pid, before in shipped.rss_before.items():
        # Zero would be a process that is gone: the bound holds only for a worker measured alive throughout.
        assert before > 0
        assert shipped.rss_after[pid] > 0
        assert shipped.rss_after[pid] - before <= RSS_GROWTH_BOUND_KIB, (pid, before, shipped.rss_after[pid])
        # The first floods may leave the allocator holding what they used; one more equal flood must not add.
        grown = run.rss_after_third[pid] - run.rss_after_second[pid]
        assert grown <= RSS_REPEAT_GROWTH_BOUND_KIB, (pid, run.rss_after_second[pid], run.rss_after_third[pid])


# --- a flood of stalled near-limit bodies ------------------------------------------------------------------

#: The chart's memory limit for a pod (helm/attest-service/values.yaml, resources.limits.memory), in KiB.
CHART_MEMORY_LIMIT_KIB = 512 * 1024
#: Seconds a body may take in the flooded service: short, so that a flood ends quickly.
FLOOD_BODY_TIMEOUT_SECONDS = 3.0
#: Stalled connections per flood (the shipped workers take 1000 each), and the loopback addresses they
#: come from (so that the per-source bound is not what holds them back).
STALLED_COUNT = 400
STALLED_SOURCES = 50
#: What a worker may hold beyond the bodies' bytes at its peak: each body once more while it is joined,
#: and the allocator's own keeping, in KiB.
PER_WORKER_SLACK_KIB = 48 * 1024
#: Growth of the third equal flood's peak over the higher of the first two, in KiB: memory given back, not
#: leaked. The first two set the allocator's high-water mark (how many bodies a flood holds at once varies with
#: scheduling, so one flood alone may stay below it); a leak grows every flood's peak, the third's too.
REPEAT_GROWTH_BOUND_KIB = 16 * 1024


@dataclass(frozen=True, slots=True)
class Floods:
    first: StalledReport
    second: StalledReport
    third: StalledReport
    workers: list[int]
    master: int


@pytest.fixture(scope="module")
def floods(tmp_path_factory: pytest.TempPathFactory) -> Floods:
    workdir = tmp_path_factory.mktemp("stalled")
    factory = DocumentFactory(workdir / "pinned")
    with redis_server(workdir / "redis") as redis:
        env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url,
                          extra={"ATTEST_BODY_TIMEOUT_SECONDS": str(FLOOD_BODY_TIMEOUT_SECONDS)})
        with running_service(env, workdir) as service:
            pids = [service.master_pid, *service.worker_pids()]
            # Long enough for the last connections the workers accept, on a loaded machine, to be answered.
            seconds = FLOOD_BODY_TIMEOUT_SECONDS * 4
            first = stalled_flood(service.port, pids, count=STALLED_COUNT, sources=STALLED_SOURCES, seconds=seconds)
            second = stalled_flood(service.port, pids, count=STALLED_COUNT, sources=STALLED_SOURCES, seconds=seconds)
            third = stalled_flood(service.port, pids, count=STALLED_COUNT, sources=STALLED_SOURCES, seconds=seconds)
            workers = service.worker_pids()
    for name, report in (("first", first), ("second", second), ("third", third)):
        print(f"\nstalled flood ({name}): answers {dict(report.answers)}, {report.sent_bytes / 2**20:.0f} MiB sent;"
              f" RSS KiB before {report.rss_before}, peak {report.rss_peak}, peak total {report.peak_total_kib}")
    return Floods(first=first, second=second, third=third, workers=workers, master=service.master_pid)


def test_stalled_bodies_are_answered_within_the_body_timeout(floods: Floods) -> None:
    for report in (floods.first, floods.second, floods.third):
        # 408 once the timeout passed, or refused at once: 503 when the worker holds its limit of body bytes,
        # 429 when the source has its limit of bodies in flight. Nothing is left waiting.
        assert set(report.answers) <= {"408", "429", "503"}, report.answers
        assert report.answers["408"] > 0
        assert sum(report.answers.values()) == STALLED_COUNT


def test_stalled_bodies_hold_at_most_the_gates_budget_per_worker(floods: Floods) -> None:
    assert floods.first.rss_before.keys() == {floods.master, *floods.workers}
    for pid in floods.workers:
        assert floods.first.growth_kib(pid) <= MAX_BUFFERED_BYTES // 1024 + PER_WORKER_SLACK_KIB, \
            (pid, floods.first.rss_before[pid], floods.first.rss_peak[pid])


def test_stalled_bodies_keep_the_service_inside_the_charts_memory_limit(floods: Floods) -> None:
    # The shipped configuration: two workers of 1000 connections each, as in the chart.
    assert len(floods.workers) == 2
    assert max(report.peak_total_kib for report in (floods.first, floods.second, floods.third)) \
        < CHART_MEMORY_LIMIT_KIB


def test_an_equal_later_flood_does_not_grow_memory_further(floods: Floods) -> None:
    for pid in floods.workers:
        mark = max(floods.first.rss_peak[pid], floods.second.rss_peak[pid])
        assert floods.third.rss_peak[pid] - mark <= REPEAT_GROWTH_BOUND_KIB, \
            (pid, floods.first.rss_peak[pid], floods.second.rss_peak[pid], floods.third.rss_peak[pid])
