"""Fail closed, recover without a restart: Redis stopped, restarted, frozen (SIGSTOP); SQLite locked or unusable."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from attest_service.errors import StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis.keys import seen_key
from tests.support.redis_server import RedisClusterNodes, RedisServer, redis_cluster

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

Unique = Callable[[str], str]
#: Slack on top of the configured timeout for scheduling and Python overhead (seconds).
SLACK_SECONDS = 0.4


def accept(store: NonceStore, nonce: str) -> Acceptance:
    now = utcnow()
    return store.accept(
        nonce, client_id="client", expires_at=now + timedelta(minutes=5), require_challenge=False, now=now
    )


def refused_within(store: NonceStore, nonce: str, seconds: float) -> float:
    """Assert that accepting ``nonce`` fails with StoreUnavailable within ``seconds``; returns the time taken."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        accept(store, nonce)
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"StoreUnavailable took {elapsed:.2f} s"
    return elapsed


# --- standalone Redis ----------------------------------------------------------------------------------


@requires_redis
def test_stopped_redis_fails_fast_and_recovers(server: RedisServer, redis_store: NonceStore, unique: Unique) -> None:
    accept(redis_store, unique("before"))
    server.stop()
    refused_within(redis_store, unique("down"), TIMEOUT_SECONDS + SLACK_SECONDS)
    with pytest.raises(StoreUnavailable):
        redis_store.ping()
    server.start()
    redis_store.ping()
    assert accept(redis_store, unique("after")) == Acceptance(challenge=False)


@requires_redis
def test_restarted_redis_is_used_at_once(server: RedisServer, redis_store: NonceStore, unique: Unique) -> None:
    # The pooled connection dies with the old process; the first call after the restart must still succeed.
    accept(redis_store, unique("before"))
    server.restart()
    assert accept(redis_store, unique("after")) == Acceptance(challenge=False)


@pytest.mark.slow
@requires_redis
def test_store_opened_while_redis_is_down_connects_later(tmp_path: Path, unique: Unique) -> None:
    server = RedisServer(tmp_path / "late")
    server.start()
    url = server.url
    server.stop()
    store = open_store(url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        refused_within(store, unique("down"), TIMEOUT_SECONDS + SLACK_SECONDS)
        with server:
            assert accept(store, unique("up")) == Acceptance(challenge=False)
    finally:
        store.close()


@requires_redis
def test_frozen_redis_fails_within_the_timeout(server: RedisServer, redis_store: NonceStore, unique: Unique) -> None:
    accept(redis_store, unique("before"))
    with server.frozen():
        elapsed = refused_within(redis_store, unique("frozen"), TIMEOUT_SECONDS + SLACK_SECONDS)
        assert elapsed >= TIMEOUT_SECONDS * 0.9  # it did wait for the answer, up to the timeout
        with pytest.raises(StoreUnavailable):
            redis_store.ping()
    assert accept(redis_store, unique("thawed")) == Acceptance(challenge=False)


# --- Redis Cluster -------------------------------------------------------------------------------------
# The cluster has no replicas: none is required of it (min_replicas=0; the default with a cluster is one).


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
def cluster(module_cluster: RedisClusterNodes) -> RedisClusterNodes:
    """The module's cluster with every node running again (creating a cluster costs about two seconds)."""
    module_cluster.start()
    return module_cluster


def owner_index(cluster: RedisClusterNodes, nonce: str) -> int:
    """Which node of ``cluster`` holds the slot of ``nonce``'s keys."""
    client = RedisCluster(host=cluster.nodes[0].host, port=cluster.nodes[0].port)
    try:
        node = client.get_node_from_key(seen_key(nonce))
        assert node is not None
        return next(i for i, n in enumerate(cluster.nodes) if n.port == node.port)
    finally:
        client.close()


def nonces_on_every_node(cluster: RedisClusterNodes, unique: Unique) -> dict[int, str]:
    """One fresh nonce per node, by node index, each picked for the slot its keys hash to.

    Twelve random nonces missed one of three nodes about one run in 43 (3 x (2/3)^12); drawing until every
    node has one always covers them (at most a few dozen draws).
    """
    by_owner: dict[int, str] = {}
    for attempt in range(1000):
        nonce = unique(f"nonce{attempt}")
        by_owner.setdefault(owner_index(cluster, nonce), nonce)
        if len(by_owner) == len(cluster.nodes):
            return by_owner
    raise AssertionError(f"1000 nonces did not cover the {len(cluster.nodes)} nodes: {sorted(by_owner)}")


@requires_redis
def test_cluster_node_down_fails_closed_and_recovers(cluster: RedisClusterNodes, unique: Unique) -> None:
    store = open_store(cluster.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
    try:
        store.ping()
        by_owner = nonces_on_every_node(cluster, unique)
        victim = cluster.nodes[0]
        victim.stop()
        refused_within(store, by_owner[0], TIMEOUT_SECONDS + SLACK_SECONDS)
        # Slots held by the surviving nodes are still served (their keys never lived on the stopped node).
        assert accept(store, by_owner[1]) == Acceptance(challenge=False)
        victim.start()
        cluster.wait_ok()
        assert accept(store, by_owner[0]) == Acceptance(challenge=False)
        store.ping()
    finally:
        store.close()


@requires_redis
def test_cluster_node_frozen_fails_within_the_timeout(cluster: RedisClusterNodes, unique: Unique) -> None:
    store = open_store(cluster.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
    try:
        nonce = unique("nonce")
        while owner_index(cluster, nonce) != 1:
            nonce = unique(nonce)
        store.ping()
        with cluster.nodes[1].frozen():
            refused_within(store, nonce, TIMEOUT_SECONDS + SLACK_SECONDS)
        cluster.wait_ok()
        assert accept(store, unique("thawed")) == Acceptance(challenge=False)
    finally:
        store.close()


@requires_redis
def test_cluster_entirely_down_then_back(cluster: RedisClusterNodes, unique: Unique) -> None:
    store = open_store(cluster.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
    try:
        accept(store, unique("before"))
        cluster.stop()
        refused_within(store, unique("down"), TIMEOUT_SECONDS + SLACK_SECONDS)
        cluster.start()
        assert accept(store, unique("after")) == Acceptance(challenge=False)
    finally:
        store.close()


# --- SQLite ----------------------------------------------------------------------------------------------


def test_sqlite_write_lock_held_elsewhere_fails_within_the_timeout(tmp_path: Path, unique: Unique) -> None:
    path = tmp_path / "nonces.sqlite3"
    store = open_store(f"sqlite:///{path}", timeout_seconds=0.2)
    try:
        store.ping()
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            elapsed = refused_within(store, unique("locked"), 0.2 + SLACK_SECONDS)
            assert elapsed >= 0.15
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert accept(store, unique("free")) == Acceptance(challenge=False)
    finally:
        store.close()


def test_sqlite_unusable_path_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = open_store(f"sqlite:///{tmp_path / 'file' / 'nonces.sqlite3'}", timeout_seconds=0.2)
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.close()


def test_sqlite_directory_is_created_on_first_use(tmp_path: Path) -> None:
    path = tmp_path / "state" / "attest-service" / "nonces.sqlite3"
    store = open_store(f"sqlite:///{path}", timeout_seconds=0.2)
    assert not path.parent.exists()
    store.ping()
    assert path.exists()
    store.close()
