"""Redis behind Sentinel: a real master and a real sentinel (``redis-server --sentinel``)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from tests.support.redis_server import RedisServer, SentinelServer, redis_sentinel, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis

#: The values the chart ships for a highly available install (Sentinel).
HA_VALUES = Path(__file__).resolve().parents[2] / "helm" / "values-ha.yaml"


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    # A replica is synchronised at once, not after the default five seconds of waiting for others to join
    # (the setting also applies after a restart, when the old master becomes the new master's replica).
    with redis_server(tmp_path / "master", extra_args=("--repl-diskless-sync-delay", "0")) as server:
        yield server


@pytest.fixture
def sentinel(master: RedisServer, tmp_path: Path) -> Iterator[SentinelServer]:
    with redis_sentinel(master, tmp_path / "sentinel") as running:
        yield running


@pytest.fixture
def store(sentinel: SentinelServer) -> Iterator[NonceStore]:
    # These tests are about finding the master through the sentinel; the master has no replica, so none is
    # required (the default behind Sentinel is one: test_store_replication.py, and the failovers below).
    opened = open_store(sentinel.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
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
        # An explicit 0 (unsafe, documented): the promoted master has no replica of its own, and with one
        # required it would refuse every acceptance until another replica joins. This test is about the
        # client following the failover.
        store = open_store(sentinel.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=0)
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


def replica_online(master: RedisServer) -> bool:
    """Whether ``master`` reports its replica connected and in sync (``state=online``: the full sync is done)."""
    client = master.client()
    try:
        return bool(client.info("replication").get("slave0", {}).get("state") == "online")
    finally:
        client.close()


def accepts(store: NonceStore, nonce: str) -> bool:
    try:
        accept(store, nonce)
    except StoreUnavailable:
        return False
    return True


# --- the shipped HA values: Sentinel, one required replica -------------------------------------------------


def ha_values_min_replicas() -> int:
    """``settings.storeMinReplicas`` of helm/values-ha.yaml, the values the chart ships for Sentinel."""
    values = yaml.safe_load(HA_VALUES.read_text(encoding="utf-8"))
    required = values["settings"]["storeMinReplicas"]
    assert isinstance(required, int)
    return required


@dataclass
class SentinelPair:
    """A master with one replica in sync, watched by a sentinel."""

    master: RedisServer
    replica: RedisServer
    sentinel: SentinelServer
    stack: contextlib.ExitStack
    workdir: Path

    def add_replica_of_promoted(self) -> RedisServer:
        """Start a new replica of the promoted replica (stopped with the fixture) and wait until it is in sync."""
        client = self.replica.client()
        try:
            client.config_set("repl-diskless-sync-delay", 0)  # sync the newcomer at once
        finally:
            client.close()
        newcomer = self.stack.enter_context(RedisServer(
            self.workdir / "newcomer", extra_args=("--replicaof", self.replica.host, str(self.replica.port))))
        wait_until(lambda: replica_online(self.replica), "the new replica to be in sync")
        return newcomer

    def master_port(self) -> int:
        client = self.sentinel.client()
        try:
            _, port = client.execute_command("SENTINEL", "get-master-addr-by-name", self.sentinel.service_name)
        finally:
            client.close()
        return int(port)


@pytest.fixture
def sentinel_pair(master: RedisServer, tmp_path: Path) -> Iterator[SentinelPair]:
    replica_args = ("--replicaof", master.host, str(master.port))
    with (
        contextlib.ExitStack() as stack,
        RedisServer(tmp_path / "replica", extra_args=replica_args) as replica,
        redis_sentinel(master, tmp_path / "sentinel-ha") as sentinel,
    ):
        wait_until(lambda: replicas_known(sentinel) == 1, "sentinel to discover the replica")
        wait_until(lambda: replica_online(master), "the replica to be in sync")
        yield SentinelPair(master, replica, sentinel, stack, tmp_path)


def promote(pair: SentinelPair) -> None:
    """SIGKILL the master, then wait until the sentinel promoted the replica and a new replica joined it.

    With one replica required, the promoted master accepts nothing until it has a replica of its own: a new
    one joins (the old master, restarted, would too, but only once the sentinel turns it into a replica).
    """
    pair.master.kill()
    pair.replica.thaw()
    wait_until(lambda: pair.master_port() == pair.replica.port, "the sentinel to promote the replica")
    pair.add_replica_of_promoted()


def decision(store: NonceStore, nonce: str) -> Acceptance | NonceReplayed:
    """The store's first answer that is not a refusal for want of the store (the failover, a replica to come)."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT_SECONDS
    while True:
        try:
            return accept(store, nonce)
        except NonceReplayed as exc:
            return exc
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_shipped_ha_values_keep_an_acceptance_through_a_failover(
    sentinel_pair: SentinelPair, unique: Callable[[str], str]
) -> None:
    required = ha_values_min_replicas()
    assert required == 1
    store = open_store(sentinel_pair.sentinel.url, timeout_seconds=TIMEOUT_SECONDS, min_replicas=required)
    try:
        # Accepted means the replica confirmed the record: the master may die the next moment. (On a loaded
        # machine the confirmation can take longer than the store timeout allows; that attempt fails closed
        # and leaves its nonce recorded, so the next one takes a fresh nonce.)
        attempts = itertools.count()
        accepted: list[str] = []

        def accept_fresh() -> bool:
            nonce = unique(f"ha-consumed-{next(attempts)}")
            if accepts(store, nonce):
                accepted.append(nonce)
            return bool(accepted)

        wait_until(accept_fresh, "an acceptance confirmed by the replica")
        consumed = accepted[0]
        promote(sentinel_pair)
        assert isinstance(decision(store, consumed), NonceReplayed)
        # The promoted master has a replica again: fresh nonces are accepted (an attempt the store refused
        # leaves its nonce recorded, so every attempt takes a fresh one).
        wait_until(lambda: accepts(store, unique(f"ha-after-{next(attempts)}")),
                   "the new replica to confirm an acceptance")
    finally:
        store.close()


@pytest.mark.slow
def test_by_default_an_acceptance_the_replica_did_not_confirm_is_refused(
    sentinel_pair: SentinelPair, unique: Callable[[str], str]
) -> None:
    # No ATTEST_STORE_MIN_REPLICAS: behind Sentinel one replica is required.
    store = open_store(sentinel_pair.sentinel.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        store.ping()
        nonce = unique("unconfirmed")
        # The replication link breaks just before the acceptance (as in a partition) and the master dies
        # before the replica reconnects; the replica is frozen meanwhile so that it cannot reconnect early.
        sentinel_pair.replica.freeze()
        disconnect_replicas(sentinel_pair.master)
        try:
            before = accept(store, nonce)
        except StoreUnavailable as exc:
            before = exc
        promote(sentinel_pair)
        # The promoted replica never had the record: had the first answer been an acceptance, the document
        # would now be accepted a second time.
        assert isinstance(before, StoreUnavailable), f"accepted without a replica's confirmation: {before}"
        answers = [decision(store, nonce), decision(store, nonce)]
        assert sum(isinstance(answer, Acceptance) for answer in answers) <= 1, answers
        assert isinstance(answers[1], NonceReplayed), answers
    finally:
        store.close()


def disconnect_replicas(master: RedisServer) -> None:
    """Close ``master``'s replication links (``CLIENT KILL TYPE replica``)."""
    client = master.client()
    try:
        assert int(client.execute_command("CLIENT", "KILL", "TYPE", "replica")) >= 1
    finally:
        client.close()
