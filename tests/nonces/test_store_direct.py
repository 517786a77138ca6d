"""The store's direct use of redis-py connections: the same bytes on the wire, the same recovery."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from attest_service.errors import NonceReplayed
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis_store import pack_command
from tests.support.redis_server import RedisServer, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


@pytest.fixture
def store(server: RedisServer) -> Iterator[NonceStore]:
    opened = open_store(server.url, timeout_seconds=TIMEOUT_SECONDS)
    yield opened
    opened.close()


def accept(store: NonceStore, nonce: str) -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id="client", expires_at=now + timedelta(minutes=5), require_challenge=False,
                        now=now, scope="vm")


@pytest.mark.parametrize("args", [
    ("EVALSHA", "0" * 40, 2, "attest:{a}:ch", "attest:{a}:seen", "client", "0", "360000", "tok", ""),
    ("EVAL", "return 1", 0),
    ("SET", "clé", "välue ☃", "PX", 10**12),
    ("GET", ""),
])
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[str | int, ...]) -> None:
    connection = redis.Redis().connection_pool.make_connection()
    assert pack_command(*args) == b"".join(connection.pack_command(*args))


def test_connections_killed_by_the_server_are_remade(store: NonceStore, server: RedisServer) -> None:
    accept(store, "before")
    admin = server.client()
    # Every connection but this one is dropped by the server, as after a restart or an idle timeout.
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert accept(store, "after") == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed):
        accept(store, "after")
    admin.close()


def test_close_disconnects_the_store(store: NonceStore, server: RedisServer) -> None:
    accept(store, "one")
    admin = server.client()
    before = len(admin.client_list())
    store.close()
    assert len(admin.client_list()) < before
    admin.close()


def test_a_script_the_server_forgot_is_sent_again_in_full(store: NonceStore, server: RedisServer) -> None:
    accept(store, "first")
    admin = server.client()
    admin.script_flush()
    assert accept(store, "second") == Acceptance(challenge=False)
    admin.close()
