"""Stores under test: real SQLite files and real redis-server processes (standalone and a three-node cluster).

Contract tests take the ``make_store`` fixture, which is parametrised over every backend; each test uses
fresh nonces and client ids (``unique``), so servers are shared per session and never flushed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attest_service.nonces import NonceStore, open_store
from tests.support import tools
from tests.support.redis_server import RedisClusterNodes, RedisServer, redis_cluster, redis_server

#: Bound on a store round trip in these tests (seconds), the service's default.
TIMEOUT_SECONDS = 0.5

requires_redis = tools.requires_redis

StoreFactory = Callable[..., NonceStore]


def utcnow() -> datetime:
    """The current instant, aware: Redis expires keys on its own clock, so Redis tests pass the real time."""
    return datetime.now(UTC)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Makes names no other test uses, e.g. ``unique("nonce")``."""
    run = uuid.uuid4().hex[:12]
    return lambda label: f"{label}-{run}"


@pytest.fixture(scope="session")
def standalone_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone server shared by the contract tests (tests that stop or freeze a server start their own)."""
    tools.require("redis-server", "redis-cli")
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone server of the test's own, for tests that stop, freeze or flush it."""
    tools.require("redis-server", "redis-cli")
    with redis_server(tmp_path / "redis") as running:
        yield running


@pytest.fixture
def redis_store(server: RedisServer) -> Iterator[NonceStore]:
    """A store on the test's own server (:func:`server`), closed after the test."""
    opened = open_store(server.url, timeout_seconds=TIMEOUT_SECONDS)
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """One three-master cluster shared by the contract tests."""
    tools.require("redis-server", "redis-cli")
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def _close_all(stores: list[NonceStore]) -> None:
    for store in stores:
        store.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=[pytest.mark.slow, requires_redis]),
                        pytest.param("redis-cluster", marks=[pytest.mark.slow, requires_redis])])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ``ATTEST_NONCE_STORE`` URL of one backend."""
    backend: str = request.param
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("standalone_redis")
        return server.url
    cluster: RedisClusterNodes = request.getfixturevalue("shared_cluster")
    return cluster.url


@pytest.fixture
def make_store(store_url: str) -> Iterator[StoreFactory]:
    """Opens stores on the backend under test (``challenge_ttl_seconds`` etc. may be passed); closes them after."""
    stores: list[NonceStore] = []

    def make(**options: float) -> NonceStore:
        options.setdefault("timeout_seconds", TIMEOUT_SECONDS)
        if store_url.startswith("redis+cluster://"):
            # The shared cluster has no replicas (the contract does not depend on them): none can confirm an
            # acceptance, so none is required here. With replicas, the default is one (test_store_replication).
            options.setdefault("min_replicas", 0)
        store = open_store(store_url, **options)
        stores.append(store)
        return store

    yield make
    _close_all(stores)


@pytest.fixture
def store(make_store: StoreFactory) -> NonceStore:
    """A store with default settings on the backend under test."""
    return make_store()
