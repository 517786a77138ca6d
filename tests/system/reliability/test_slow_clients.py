"""Slow and hostile clients, bounded: 100 connections sending one body byte a second, then a hostile flood.

The shipped gunicorn configuration (gevent workers) is measured as shipped.
``python benchmarks/slow_clients.py`` is the longer version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.redis_server import redis_server
from tests.system.reliability.conftest import requires_redis
from tests.system.reliability.harness import DocumentFactory, gunicorn_argv, running_service, service_env
from tests.system.reliability.slow import SlowReport, run_slow_clients

pytestmark = [pytest.mark.slow, requires_redis]

#: Share of probes that must be verified while the slow clients hold their connections.
SERVED_FRACTION = 0.95
#: Growth of a worker's resident memory over the hostile flood that still counts as bounded, in KiB:
#: a few 1 MiB bodies held at once per thread, and the allocator keeping what it once used.
RSS_GROWTH_BOUND_KIB = 64 * 1024


def _run(variant: str, workdir: Path, *, hostile_seconds: float) -> SlowReport:
    factory = DocumentFactory(workdir / "pinned")
    with redis_server(workdir / "redis") as redis:
        env = service_env(pinned_dir=factory.pinned_dir, store_url=redis.url)
        with running_service(env, workdir, argv=gunicorn_argv(variant)) as service:
            report = run_slow_clients(service.port, service.worker_pids(), factory, variant=variant, slow_count=100,
                                      attack_seconds=6.0, probe_rate=5.0, hostile_seconds=hostile_seconds,
                                      probe_seconds=2.0)
    print(f"\n{variant}: alone {report.baseline}\n  under attack {report.under_attack}\n  after {report.probe_after}"
          f"\n  hostile {dict(report.hostile)}\n  RSS before {report.rss_before} after {report.rss_after}")
    return report


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> SlowReport:
    return _run("shipped", tmp_path_factory.mktemp("slow-shipped"), hostile_seconds=8.0)


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


def test_hostile_bodies_leave_worker_memory_bounded(shipped: SlowReport) -> None:
    for pid, before in shipped.rss_before.items():
        assert shipped.rss_after[pid] - before <= RSS_GROWTH_BOUND_KIB, (pid, before, shipped.rss_after[pid])
