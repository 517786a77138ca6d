"""Two service instances on a real Redis Cluster of three primaries and three replicas, through a failover.

The cluster runs on loopback with ``cluster-node-timeout`` 1000 ms, so a killed primary is replaced by its
replica within a few seconds. The store keeps a nonce's records under ``attest:{sha256(nonce)}:...``; the tests
pick nonces whose hash slot (``CLUSTER KEYSLOT``) the primary they kill serves.

Redis replicates asynchronously, so what a failover preserves is exactly what had reached the replica when the
primary died. The instances run with the default of a cluster URL (ATTEST_STORE_MIN_REPLICAS unset: one
replica must confirm each acceptance with ``WAIT``). The tests show both sides: records the replica had
received are still refused after the promotion, and an acceptance the replica could not confirm is refused
(503), so the record the promotion loses never stood for an acceptance: the document is accepted at most once.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from attest_service.nonces.redis.keys import seen_key
from tests.support import tools
from tests.support.redis_server import RedisClusterNodes, RedisServer, redis_cluster
from tests.support.service import DocumentFactory, Reply, ServiceProcess

from . import properties
from .conftest import service_pair

pytestmark = [pytest.mark.slow, tools.requires_redis]

#: Nonces accepted (and confirmed replicated) before the primary serving them is killed.
DURABLE_NONCES: Final = 6
#: Distinct nonces submitted, each several times, while the failover is in progress.
FAILOVER_NONCES: Final = 24
#: Milliseconds ``WAIT`` may block for a replica's acknowledgement.
WAIT_TIMEOUT_MS: Final = 2000
#: Seconds the instances may take to answer again after the promotion (their clients re-read the slot map).
RECOVERY_TIMEOUT_SECONDS: Final = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with redis_cluster(tmp_path_factory.mktemp("cluster"), replicas=1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def pair(cluster: RedisClusterNodes, factory: DocumentFactory,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[properties.Pair]:
    # Every primary has a replica. ATTEST_STORE_MIN_REPLICAS is left unset: with a cluster URL an acceptance
    # counts only once a replica holds the record, by default.
    with service_pair(cluster.url, factory, tmp_path_factory.mktemp("pair"),
                      rate_limit_per_minute=properties.GENEROUS_RATE_LIMIT) as instances:
        yield instances


# --- the properties of one Redis, on the cluster ------------------------------------------------------


def test_nonce_accepted_by_one_is_refused_by_the_other(pair: properties.Pair, factory: DocumentFactory) -> None:
    properties.check_replay_refused_across(pair, factory)


def test_challenge_issued_by_one_is_consumed_once_at_the_other(pair: properties.Pair,
                                                               factory: DocumentFactory) -> None:
    properties.check_challenge_crosses_instances(pair, factory)


def test_racing_posts_over_both_instances_accept_once(pair: properties.Pair, factory: DocumentFactory) -> None:
    properties.check_one_of_racing_posts_accepted(pair, factory)


def test_rate_limit_is_shared(cluster: RedisClusterNodes, factory: DocumentFactory, tmp_path: Path) -> None:
    with service_pair(cluster.url, factory, tmp_path,
                      rate_limit_per_minute=properties.SMALL_RATE_LIMIT) as metered:
        properties.check_rate_limit_shared(metered, properties.SMALL_RATE_LIMIT)


# --- failover ------------------------------------------------------------------------------------------


def hash_tag(nonce: str) -> str:
    """The hash tag of ``nonce``'s records: what the cluster hashes to place them."""
    key = seen_key(nonce)
    return key[key.index("{") + 1:key.index("}")]


def nonces_served_by(cluster: RedisClusterNodes, primary: RedisServer, count: int, prefix: str) -> list[str]:
    """``count`` fresh nonces whose records' slot (``CLUSTER KEYSLOT`` of the seen key) ``primary`` serves."""
    found: list[str] = []
    while len(found) < count:
        nonce = properties.unique_nonce(prefix)
        if cluster.master_of_slot(cluster.keyslot(seen_key(nonce))) is primary:
            found.append(nonce)
    return found


def replicas_acknowledging(primary: RedisServer, nonce: str) -> int:
    """Write a probe key in ``nonce``'s slot on ``primary`` and ``WAIT`` for replicas on that connection.

    A replica applies the replication stream in order, so its acknowledgement of the probe means it holds
    every write the primary made before, including the service's records of ``nonce``.
    """
    client = primary.client()
    try:
        pipeline = client.pipeline(transaction=False)
        pipeline.set(f"probe:{{{hash_tag(nonce)}}}", "1", px=60_000)
        pipeline.execute_command("WAIT", 1, WAIT_TIMEOUT_MS)
        _, acknowledged = pipeline.execute()
        return int(acknowledged)
    finally:
        client.close()


def disconnect_replicas(primary: RedisServer) -> None:
    """Close ``primary``'s replication links (``CLIENT KILL TYPE replica``)."""
    client = primary.client()
    try:
        assert int(client.execute_command("CLIENT", "KILL", "TYPE", "replica")) >= 1
    finally:
        client.close()


def primary_with_replica(cluster: RedisClusterNodes) -> tuple[RedisServer, RedisServer]:
    """A healthy primary and its live replica."""
    for primary, replica in cluster.topology().items():
        if replica is not None and replica.running:
            return primary, replica
    raise AssertionError("no primary has a live replica left")


def wait_until_serving(pair: properties.Pair, factory: DocumentFactory, cluster: RedisClusterNodes,
                       primary: RedisServer) -> None:
    """Wait until both instances accept a fresh nonce of ``primary``'s slots (their slot maps caught up)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
    for instance in pair:
        while True:
            nonce = nonces_served_by(cluster, primary, 1, "recovery")[0]
            reply = properties.verify(instance, factory, nonce, "failover")
            if reply.status == 200:
                break
            assert (reply.status, reply.code) == (503, "store_unavailable"), reply
            assert time.monotonic() < deadline, f"{instance.url} still refuses after the failover: {reply}"
            time.sleep(0.05)


def decision(instance: ServiceProcess, body: dict[str, object]) -> Reply:
    """The first answer that is not 503: after a failover each worker's cluster client refreshes its slot map
    on its own first failure, which is a refusal (503), not a decision."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
    while True:
        reply = instance.post("/v1/verify", body, key=properties.KEYS["failover"])
        if reply.status != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def test_failover_keeps_replicated_nonces_and_never_accepts_twice(
        cluster: RedisClusterNodes, pair: properties.Pair, factory: DocumentFactory) -> None:
    victim, replica = primary_with_replica(cluster)

    # 1. Nonces accepted through both instances, whose records live on the victim, confirmed on its replica.
    durable = nonces_served_by(cluster, victim, DURABLE_NONCES, "durable")
    durable_bodies = {nonce: factory.verify_body(nonce) for nonce in durable}
    for index, nonce in enumerate(durable):
        reply = pair.at(index).post("/v1/verify", durable_bodies[nonce], key=properties.KEYS["failover"])
        assert reply.status == 200, reply
    assert replicas_acknowledging(victim, durable[-1]) >= 1

    # 2. SIGKILL the primary; keep submitting through both instances until the replica serves its slots.
    during = nonces_served_by(cluster, victim, FAILOVER_NONCES, "during")
    during_bodies = {nonce: factory.verify_body(nonce) for nonce in during}
    replies: dict[str, list[Reply]] = defaultdict(list)
    promoted = threading.Event()
    promotion_seconds: list[float] = []

    def watch() -> None:
        promotion_seconds.append(cluster.wait_promoted(replica))
        promoted.set()

    victim.kill()
    watcher = threading.Thread(target=watch)
    watcher.start()
    index = 0
    while not promoted.is_set() and watcher.is_alive():
        fresh, old = during[index % len(during)], durable[index % len(durable)]
        replies[fresh].append(pair.at(index).post("/v1/verify", during_bodies[fresh],
                                                  key=properties.KEYS["failover"]))
        replies[old].append(pair.at(index + 1).post("/v1/verify", durable_bodies[old],
                                                    key=properties.KEYS["failover"]))
        index += 1
    watcher.join()
    assert promoted.is_set(), "the replica was not promoted"
    assert cluster.master_of_slot(cluster.keyslot(seen_key(durable[0]))) is replica

    # During the failover every answer is an acceptance, a replay or a refusal for want of the store.
    seen = {(reply.status, reply.code) for answers in replies.values() for reply in answers}
    assert seen <= {(200, None), (409, "nonce_replayed"), (503, "store_unavailable")}, seen
    assert (503, "store_unavailable") in seen, "the failover went unnoticed: nothing was refused"
    for nonce in durable:
        assert all(reply.status != 200 for reply in replies[nonce]), f"{nonce} accepted again during failover"
    for nonce in during:
        assert sum(reply.status == 200 for reply in replies[nonce]) <= 1, f"{nonce} accepted twice"

    # 3. The old primary rejoins as the new primary's replica (until then, with one replica required, the
    # victim's slots fail closed). The replicated nonces are still refused, by both instances.
    victim.start()
    wait_until_serving(pair, factory, cluster, replica)
    for nonce in durable:
        for instance in pair:
            reply = decision(instance, durable_bodies[nonce])
            assert (reply.status, reply.code) == (409, "nonce_replayed"), (nonce, reply)
    # Every nonce of the failover window is accepted at most once overall. One refused with 503 may have
    # left a record that no replica confirmed (the answer was a refusal, so nothing was accepted); it is then
    # refused as a replay now, or accepted once if the failover lost that record.
    for nonce in during:
        accepted_before = sum(reply.status == 200 for reply in replies[nonce])
        first = decision(pair.first, during_bodies[nonce])
        second = decision(pair.second, during_bodies[nonce])
        assert first.status in (200, 409), (nonce, first)
        assert second.status == 409, (nonce, second)
        assert accepted_before + (first.status == 200) <= 1, (nonce, replies[nonce], first)
    print(f"promotion after {promotion_seconds[0]:.2f} s; answers during the failover: "
          f"{sum(len(answers) for answers in replies.values())}")


def test_acceptance_unreplicated_at_failover_is_not_accepted_again(
        cluster: RedisClusterNodes, pair: properties.Pair, factory: DocumentFactory) -> None:
    victim, replica = primary_with_replica(cluster)
    nonce = nonces_served_by(cluster, victim, 1, "lagging")[0]
    body = factory.verify_body(nonce)
    # The replication link breaks just before the acceptance, as in a network partition, and the primary dies
    # before the replica reconnects. The replica is frozen (SIGSTOP) meanwhile so that it cannot reconnect
    # early; what the primary sent before closing the link still reaches it from the socket buffer.
    with replica.frozen():
        disconnect_replicas(victim)
        before = pair.first.post("/v1/verify", body, key=properties.KEYS["failover"])
        victim.kill()
    cluster.wait_promoted(replica)
    victim.start()
    wait_until_serving(pair, factory, cluster, replica)
    # The replica was frozen, so it could not confirm the record: the acceptance must not count.
    assert before.status == 503, before
    # Afterwards the document is accepted at most once; 503 (a replica slow to confirm while the old primary
    # resynchronises) is a refusal, so it is retried until the answer is a decision.
    after = decision(pair.second, body)
    assert after.status in (200, 409), after
    again = decision(pair.first, body)
    assert (again.status, again.code) == (409, "nonce_replayed"), again
