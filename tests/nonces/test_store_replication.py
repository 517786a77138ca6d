"""An acceptance counts only once the configured number of replicas hold its record."""

from __future__ import annotations

from datetime import timedelta

import pytest

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import open_store
from tests.support.redis_server import RedisServer

from .conftest import utcnow


def test_without_the_required_replica_nothing_is_accepted(standalone_redis: RedisServer) -> None:
    # A standalone server has no replica: with one required, every acceptance fails closed, and the record
    # it left on the primary makes a retry of the same document a replay, never an acceptance.
    store = open_store(standalone_redis.url, timeout_seconds=0.5, min_replicas=1)
    try:
        now = utcnow()
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            store.accept("needs-a-replica", client_id="c1", expires_at=now + timedelta(hours=6),
                         require_challenge=False, now=now)
        with pytest.raises(NonceReplayed):
            store.accept("needs-a-replica", client_id="c1", expires_at=now + timedelta(hours=6),
                         require_challenge=False, now=now)
    finally:
        store.close()
