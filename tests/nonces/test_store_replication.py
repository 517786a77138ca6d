"""An acceptance counts only once the configured number of replicas hold its record.

The number (``ATTEST_STORE_MIN_REPLICAS``) defaults to what the URL's topology can lose: 1 with Sentinel or a
Cluster, whose failovers promote a replica that may not have the record yet; 0 with a single server
(``redis://``), which has no failover to survive. An explicit 0 stays possible (docs/DEPLOYMENT.md says why
it is unsafe with a failover).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from tests.support.redis_server import RedisClusterNodes, RedisServer, SentinelServer, redis_sentinel, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = [pytest.mark.slow, requires_redis]

Unique = Callable[[str], str]


def accept(store: NonceStore, nonce: str, *, client_id: str = "c1") -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id=client_id, expires_at=now + timedelta(hours=6), require_challenge=False,
                        now=now, scope="vm-1")


def test_without_the_required_replica_nothing_is_accepted(standalone_redis: RedisServer, unique: Unique) -> None:
    # A standalone server has no replica: with one required, every acceptance fails closed. The record it left
    # on the primary makes anyone else's submission of the same document a replay; the same caller's retry is
    # never an acceptance either while no replica confirms it. The server is shared by the session: the nonce
    # is this run's own, so the first claim meets no earlier record.
    store = open_store(standalone_redis.url, timeout_seconds=0.5, min_replicas=1)
    nonce = unique("needs-a-replica")
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            accept(store, nonce)
        with pytest.raises(NonceReplayed):
            accept(store, nonce, client_id="someone-else")
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            accept(store, nonce)
    finally:
        store.close()


def test_a_single_server_needs_no_replica_by_default(standalone_redis: RedisServer, unique: Unique) -> None:
    store = open_store(standalone_redis.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        assert accept(store, unique("single")) == Acceptance(challenge=False)
    finally:
        store.close()


@pytest.fixture(scope="module")
def lone_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("lone-master")) as server:
        yield server


@pytest.fixture(scope="module")
def sentinel_of_lone_master(lone_master: RedisServer, tmp_path_factory: pytest.TempPathFactory,
                            ) -> Iterator[SentinelServer]:
    with redis_sentinel(lone_master, tmp_path_factory.mktemp("sentinel")) as sentinel:
        yield sentinel


def test_sentinel_requires_a_replica_by_default(sentinel_of_lone_master: SentinelServer, unique: Unique) -> None:
    # Behind Sentinel the master fails over to a replica; a record only the master holds would be lost.
    store = open_store(sentinel_of_lone_master.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            accept(store, unique("sentinel-default"))
    finally:
        store.close()


def test_a_cluster_requires_a_replica_by_default(shared_cluster: RedisClusterNodes, unique: Unique) -> None:
    # The shared cluster has no replicas: by default, nothing can be accepted on it.
    store = open_store(shared_cluster.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            accept(store, unique("cluster-default"))
    finally:
        store.close()


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_an_explicit_zero_is_kept(topology: str, request: pytest.FixtureRequest, unique: Unique) -> None:
    url = (request.getfixturevalue("sentinel_of_lone_master").url if topology == "sentinel"
           else request.getfixturevalue("shared_cluster").url)
    store = open_store(url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
    try:
        assert accept(store, unique(f"{topology}-zero")) == Acceptance(challenge=False)
    finally:
        store.close()
