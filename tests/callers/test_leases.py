"""Rate-budget leases: every request served was counted in the shared store first, and a lease stays small."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attest_service.callers.leases import LEASE_SECONDS, LEASE_SHARE, RateLeases
from attest_service.errors import RateLimited, StoreUnavailable
from attest_service.nonces import NonceStore, open_store

#: One fixed instant, so that every call falls in the same rate window.
NOW = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
WINDOW = 60


class Monotonic:
    """A monotonic clock the test moves by hand (lease expiry is judged by it)."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NonceStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'nonces.db'}")
    yield opened
    opened.close()


def counted(store: NonceStore, key: str, limit: int) -> int:
    """How many requests of ``key`` the store has counted in the window (consumes what is left)."""
    try:
        return limit - store.hit_rate(key, limit=limit, window_seconds=WINDOW, now=NOW, count=limit)
    except RateLimited:
        return limit


def take(leases: RateLeases, key: str, limit: int, times: int = 1) -> None:
    for _ in range(times):
        leases.take(key, limit=limit, window_seconds=WINDOW, now=NOW)


def test_a_default_budget_is_counted_request_by_request(store: NonceStore) -> None:
    # 600 a minute is below two lease shares: each request is one count in the store, as without leases.
    first, second = RateLeases(store), RateLeases(store)
    take(first, "client", 600, 7)
    take(second, "client", 600, 5)
    assert counted(store, "client", 600) == 12


def test_a_lease_doubles_while_used_up_and_shrinks_to_what_was_used(store: NonceStore) -> None:
    limit = 1000 * LEASE_SHARE
    for served, expected in ((1, 1), (2, 1 + 2), (3, 1 + 2), (4, 1 + 2 + 4), (8, 1 + 2 + 4 + 8)):
        leases = RateLeases(store, monotonic=Monotonic())
        take(leases, f"ramp-{served}", limit, served)
        assert counted(store, f"ramp-{served}", limit) == expected
    clock = Monotonic()
    leases = RateLeases(store, monotonic=clock)
    take(leases, "idle", limit, 4)  # leases of 1, 2 and 4: three of the 4 unused
    clock.value += LEASE_SECONDS
    take(leases, "idle", limit)  # expired after one use: the next lease is of one
    assert counted(store, "idle", limit) == 1 + 2 + 4 + 1


def test_a_lease_is_at_most_its_share_of_the_budget(store: NonceStore) -> None:
    limit = 4 * LEASE_SHARE  # leases of at most 4
    leases = RateLeases(store, monotonic=Monotonic())
    take(leases, "client", limit, 1 + 2 + 4 + 4 + 4)
    assert counted(store, "client", limit) == 1 + 2 + 4 + 4 + 4


def test_the_limit_holds_across_workers(store: NonceStore) -> None:
    limit = 3 * LEASE_SHARE
    workers = [RateLeases(store, monotonic=Monotonic()) for _ in range(3)]
    served = 0
    refusals: list[RateLimited] = []
    while len(refusals) < len(workers):
        refusals = []
        for worker in workers:
            try:
                worker.take("client", limit=limit, window_seconds=WINDOW, now=NOW)
                served += 1
            except RateLimited as exc:
                refusals.append(exc)
    assert all(refusal.retry_after >= 1 for refusal in refusals)
    # Never more than the limit; at most one lease per worker left unused.
    assert limit - 3 * (limit // LEASE_SHARE) <= served <= limit
    assert counted(store, "client", limit) == limit


def test_an_unusable_lease_store_fails_closed() -> None:
    broken = open_store("redis://127.0.0.1:1", timeout_seconds=0.2)
    leases = RateLeases(broken)
    for limit in (600, 100 * LEASE_SHARE):
        with pytest.raises(StoreUnavailable):
            take(leases, "client", limit)
    assert len(leases) == 0


def test_the_table_of_leases_is_bounded(store: NonceStore) -> None:
    clock = Monotonic()
    leases = RateLeases(store, monotonic=clock, capacity=3)
    for index in range(10):
        take(leases, f"client-{index}", 100 * LEASE_SHARE)
    assert len(leases) <= 3
    clock.value += LEASE_SECONDS
    take(leases, "late", 100 * LEASE_SHARE)
    assert len(leases) <= 3
