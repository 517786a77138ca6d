"""What one verification costs the shared Redis: commands per request, keys, their lifetimes and memory.

The command counts are asserted (a change to them changes the capacity planning in docs/DEPLOYMENT.md);
the memory figures are printed for that document (run with ``-s``)::

    pytest -s tests/system/scaleout/test_store_footprint.py
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import redis

from attest_service.nonces import open_store
from attest_service.nonces.redis.keys import challenge_key, seen_key
from attest_service.nonces.store import CLOCK_DISAGREEMENT_MARGIN_SECONDS
from tests.support import tools
from tests.support.redis_server import RedisServer, redis_server
from tests.support.service import DocumentFactory, ServiceProcess, running_service

from . import properties

pytestmark = [pytest.mark.slow, tools.requires_redis]

#: Verifications measured over HTTP for the command counts.
VERIFICATIONS: Final = 20
#: Nonces recorded directly through the store for the memory figure (enough to swamp allocator noise).
MEMORY_SAMPLE: Final = 5000
#: The service's defaults the lifetimes follow: document lifetime (IMDS), clock skew, challenge lifetime.
DOCUMENT_LIFETIME: Final = timedelta(hours=6)
CLOCK_SKEW: Final = timedelta(seconds=60)
CHALLENGE_TTL: Final = timedelta(seconds=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(scope="module")
def service(server: RedisServer, factory: DocumentFactory,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("service")
    env = properties.service_env(server.url, factory.pinned_dir, workdir,
                                 rate_limit_per_minute=properties.GENEROUS_RATE_LIMIT)
    with running_service(env, workdir) as running:
        yield running


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Successful calls per command since the last ``CONFIG RESETSTAT`` (INFO commandstats)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) - int(value.get("failed_calls", 0))
            for name, value in stats.items() if isinstance(value, dict)}


#: Commands that are not the service's work: this test's own reads and connection set-up (a worker may open a
#: new pooled connection at any time).
NOT_COUNTED: Final = frozenset({"info", "config|resetstat", "hello", "client|setinfo", "select", "ping"})


def measured(client: redis.Redis) -> dict[str, int]:
    """Command calls since the last reset, without :data:`NOT_COUNTED`.

    Redis counts the commands a script runs as well as the EVALSHA that ran it: EVALSHA is a round trip, the
    others are work inside it.
    """
    return {name: calls for name, calls in command_calls(client).items() if name not in NOT_COUNTED and calls}


def test_redis_commands_per_request(server: RedisServer, service: ServiceProcess, factory: DocumentFactory) -> None:
    key = properties.KEYS["replay"]
    client = server.client()
    try:
        # Warm-up: the first request of each script sends its source (EVAL); later ones only its digest.
        assert service.post("/v1/verify", factory.verify_body(properties.unique_nonce("warm")), key=key).status == 200
        bodies = [factory.verify_body(properties.unique_nonce("count")) for _ in range(VERIFICATIONS)]
        client.config_resetstat()
        for body in bodies:
            assert service.post("/v1/verify", body, key=key).status == 200
        # One round trip per verification, the accept script (GET the seen and challenge records, SET the seen
        # record), and one per lease of rate budget: this client's budget is leased (callers/leases.py), each rate
        # script call (GET both windows, INCRBY, PEXPIREAT) counting a doubling lease, in each worker.
        n = VERIFICATIONS
        calls = measured(client)
        leases = calls.get("pexpireat", 0)
        assert 1 <= leases <= 2 * (n.bit_length() + 1)
        assert calls == {"evalsha": n + leases, "get": 2 * (n + leases), "incrby": leases, "pexpireat": leases,
                         "set": n}

        client.config_resetstat()
        challenge = service.post("/v1/challenges", key=key)
        assert challenge.status == 201
        # A challenge: one SET NX PXAT, and the rate script when the worker's lease ran out.
        calls = measured(client)
        assert calls in ({"set": 1}, {"evalsha": 1, "get": 2, "incrby": 1, "pexpireat": 1, "set": 1})
        nonce = str(challenge.body["nonce"])
        assert client.exists(challenge_key(nonce)) == 1
        challenge_ttl_ms = client.pttl(challenge_key(nonce))
        challenge_bytes = client.memory_usage(challenge_key(nonce))

        assert service.post("/v1/verify", factory.verify_body(nonce), key=key).status == 200
        # Consuming the challenge deletes its record and leaves one seen record, kept past the document's expiry.
        assert client.exists(challenge_key(nonce)) == 0
        seen_ttl = timedelta(milliseconds=client.pttl(seen_key(nonce)))
        # The record outlives the document by the skew and the margin for disagreeing clocks, no longer.
        margin = timedelta(seconds=CLOCK_DISAGREEMENT_MARGIN_SECONDS)
        assert DOCUMENT_LIFETIME + margin < seen_ttl <= DOCUMENT_LIFETIME + CLOCK_SKEW + margin
        assert timedelta(0) < timedelta(milliseconds=challenge_ttl_ms) <= CHALLENGE_TTL
        seen_bytes = client.memory_usage(seen_key(nonce))
        print(f"\nredis round trips per verification: 1 (EVALSHA) and {leases} rate leases for {n}; per challenge: "
              f"1 (SET) or 2; "
              f"seen record {seen_bytes} B (TTL {seen_ttl}), challenge record {challenge_bytes} B "
              f"(TTL {timedelta(milliseconds=challenge_ttl_ms)})")
    finally:
        client.close()


def test_redis_memory_per_accepted_nonce(server: RedisServer, tmp_path: Path) -> None:
    client = server.client()
    store = open_store(server.url, timeout_seconds=2.0)
    try:
        client.flushall()
        before = int(client.info("memory")["used_memory"])
        now = datetime.now(UTC)
        for _ in range(MEMORY_SAMPLE):
            # As the service claims a caller-chosen nonce: for the VM of its document.
            store.accept(uuid.uuid4().hex, client_id="license-server", expires_at=now + DOCUMENT_LIFETIME,
                         require_challenge=False, now=now, scope=str(uuid.uuid4()))
        after = int(client.info("memory")["used_memory"])
        assert client.dbsize() == MEMORY_SAMPLE  # one key per accepted caller nonce
        per_nonce = (after - before) / MEMORY_SAMPLE
        assert 0 < per_nonce < 1024
        print(f"\nredis used_memory per accepted nonce: {per_nonce:.0f} B over {MEMORY_SAMPLE} nonces")
    finally:
        store.close()
        client.close()
