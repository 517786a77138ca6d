"""Redis behind Sentinel: a real master and a real sentinel (``redis-server --sentinel``)."""

from __future__ import annotations

import time
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
    client = master.client()
    assert client.dbsize() == 1
    client.close()


def test_master_down_fails_closed_and_recovers(
    store: NonceStore, master: RedisServer, unique: Callable[[str], str]
) -> None:
    accept(store, unique("before"))
    master.stop()
    with pytest.raises(StoreUnavailable):
        accept(store, unique("down"))
    master.start()
    assert accept(store, unique("after")) == Acceptance(challenge=False)


#: How long a failover may take: sentinel's down-after (1 s) plus election and promotion (seconds).
FAILOVER_TIMEOUT_SECONDS = 20.0


@pytest.mark.slow
def test_failover_to_replica_is_followed_without_reopening(
    master: RedisServer, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    replica_args = ("--replicaof", master.host, str(master.port))
    with (
        RedisServer(tmp_path / "replica", extra_args=replica_args) as replica,
        redis_sentinel(master, tmp_path / "sentinel-failover") as sentinel,
    ):
        wait_until(lambda: replicas_known(sentinel) == 1, "sentinel to discover the replica")
        store = open_store(sentinel.url, timeout_seconds=TIMEOUT_SECONDS)
        try:
            consumed = unique("consumed")
            accept(store, consumed)
            wait_until(lambda: replica_has_caught_up(replica, master), "the replica to catch up")
            master.stop()
            with pytest.raises(StoreUnavailable):
                accept(store, unique("during"))
            wait_until(lambda: accepts(store, unique("after")), "the store to follow the failover")
            # The promoted replica carried the record over: the nonce is still refused.
            with pytest.raises(NonceReplayed):
                accept(store, consumed)
        finally:
            store.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + FAILOVER_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def replicas_known(sentinel: SentinelServer) -> int:
    client = sentinel.client()
    try:
        return len(client.execute_command("SENTINEL", "replicas", sentinel.service_name))
    finally:
        client.close()


def replica_has_caught_up(replica: RedisServer, master: RedisServer) -> bool:
    replica_client, master_client = replica.client(), master.client()
    try:
        master_offset = master_client.info("replication")["master_repl_offset"]
        return bool(replica_client.info("replication").get("slave_repl_offset", -1) >= master_offset)
    finally:
        replica_client.close()
        master_client.close()


def accepts(store: NonceStore, nonce: str) -> bool:
    try:
        accept(store, nonce)
    except StoreUnavailable:
        return False
    return True
