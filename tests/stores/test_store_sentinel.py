"""Redis behind Sentinel: a real master and a real sentinel (``redis-server --sentinel``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from tests.support.redis_server import RedisServer, SentinelServer, redis_sentinel, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "master") as server:
        yield server


@pytest.fixture
def sentinel(master: RedisServer, tmp_path: Path) -> Iterator[SentinelServer]:
    with redis_sentinel(master, tmp_path / "sentinel") as running:
        yield running


@pytest.fixture
def store(sentinel: SentinelServer) -> Iterator[NonceStore]:
    opened = open_store(sentinel.url, timeout_seconds=TIMEOUT_SECONDS)
    yield opened
    opened.close()


def accept(store: NonceStore, nonce: str) -> Acceptance:
    now = utcnow()
    return store.accept(
        nonce, client_id="client", expires_at=now + timedelta(minutes=5), require_challenge=False, now=now
    )


def test_nonce_is_accepted_once_through_sentinel(
    store: NonceStore, master: RedisServer, unique: Callable[[str], str]
) -> None:
    nonce = unique("nonce")
    store.issue_challenge(nonce, client_id="client", expires_at=utcnow() + timedelta(minutes=5))
    assert accept(store, nonce) == Acceptance(challenge=True)
    with pytest.raises(NonceReplayed):
        accept(store, nonce)
    # The records went to the master the sentinel names.
    assert master.client().dbsize() == 1


def test_master_down_fails_closed_and_recovers(
    store: NonceStore, master: RedisServer, unique: Callable[[str], str]
) -> None:
    accept(store, unique("before"))
    master.stop()
    with pytest.raises(StoreUnavailable):
        accept(store, unique("down"))
    master.start()
    assert accept(store, unique("after")) == Acceptance(challenge=False)
