"""The store's direct use of redis-py connections: the same bytes on the wire, the same recovery."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
import redis

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis.connection import pack_command
from attest_service.nonces.redis.keys import challenge_key, scoped_seen_key, seen_key
from attest_service.nonces.redis.scripts import ACCEPT_SCRIPT, MAX_LISTED_SCOPES
from attest_service.nonces.store import scope_tag
from tests.support.redis_server import RedisServer

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis


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


def test_connections_killed_by_the_server_are_remade(redis_store: NonceStore, server: RedisServer) -> None:
    accept(redis_store, "before")
    admin = server.client()
    # Every connection but this one is dropped by the server, as after a restart or an idle timeout.
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert accept(redis_store, "after") == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed):
        accept(redis_store, "after")
    admin.close()


def test_close_disconnects_the_store(redis_store: NonceStore, server: RedisServer) -> None:
    accept(redis_store, "one")
    admin = server.client()
    before = len(admin.client_list())
    redis_store.close()
    assert len(admin.client_list()) < before
    admin.close()


def test_a_script_the_server_forgot_is_sent_again_in_full(redis_store: NonceStore, server: RedisServer) -> None:
    accept(redis_store, "first")
    admin = server.client()
    admin.script_flush()
    assert accept(redis_store, "second") == Acceptance(challenge=False)
    admin.close()


def test_a_nonce_shared_by_a_fleet_keeps_its_seen_value_small(redis_store: NonceStore, server: RedisServer) -> None:
    # A vendor's fixed nonce, used by every VM: the listed VMs stop at MAX_LISTED_SCOPES, the others get a key
    # each, so neither the value nor the work of a claim grows with the fleet.
    vms = [f"00000000-0000-4000-8000-{index:012d}" for index in range(40)]
    for vm in vms:
        now = utcnow()
        assert redis_store.accept("license-v1", client_id="vendor", expires_at=now + timedelta(minutes=5),
                            require_challenge=False, now=now, scope=vm) == Acceptance(challenge=False)
    admin = server.client()
    listed = admin.get(seen_key("license-v1"))
    assert listed is not None
    assert listed.count(b",") + 1 == MAX_LISTED_SCOPES
    own = [scoped_seen_key("license-v1", vm) for vm in vms[MAX_LISTED_SCOPES:]]
    assert all(admin.exists(key) for key in own)
    lifetimes = [admin.pttl(key) for key in own]
    # The list lives as long as the longest claim (read after the claims' lifetimes: a few ms later).
    assert min(lifetimes) > 0
    assert max(lifetimes) <= admin.pttl(seen_key("license-v1")) + 50
    for vm in (vms[0], vms[MAX_LISTED_SCOPES - 1], vms[MAX_LISTED_SCOPES], vms[-1]):
        now = utcnow()
        with pytest.raises(NonceReplayed):
            redis_store.accept("license-v1", client_id="other", expires_at=now + timedelta(minutes=5),
                         require_challenge=False, now=now, scope=vm)
    admin.close()


def test_a_resent_claim_of_a_vm_with_its_own_key_is_its_acceptance(server: RedisServer) -> None:
    # What redis-py or the direct connections send again after a lost answer: the same script, same token.
    client = server.client()
    nonce = "resent"
    for index in range(MAX_LISTED_SCOPES):
        keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, f"vm-{index}")]
        ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", f"token-{index}", scope_tag(f"vm-{index}"),
                                          MAX_LISTED_SCOPES])
    keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, "late-vm")]
    args = ["c", "0", "60000", "late-token", scope_tag("late-vm"), MAX_LISTED_SCOPES]
    assert ACCEPT_SCRIPT.run(client, keys, args) == [b"seen"]
    assert ACCEPT_SCRIPT.run(client, keys, args) == [b"accepted", b"0"]
    assert ACCEPT_SCRIPT.run(client, keys, [*args[:3], "another-token", *args[4:]])[0] == b"replayed"
    client.close()


def test_an_outage_longer_than_the_pool_recovers(server: RedisServer) -> None:
    # Every failed call during an outage used to cost one of the pool's 100 connection objects for good:
    # after the outage the store answered "Too many connections" for ever.
    store = open_store(server.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        accept(store, "before")
        server.stop()
        for index in range(250):
            with pytest.raises(StoreUnavailable) as refused:
                accept(store, f"down-{index}")
            assert "Too many connections" not in refused.value.message
        server.start()
        assert accept(store, "after") == Acceptance(challenge=False)
    finally:
        store.close()


def test_many_claims_at_once_leave_the_pool_to_the_other_commands(server: RedisServer) -> None:
    # As many claims in flight as the client pool holds (100): past its direct connections the store sends
    # through the pool, and once they are answered the pool still has room for challenges and readiness
    # checks (with a direct connection per claim, the pool had none left for them, for good).
    store = open_store(server.url, timeout_seconds=5.0)
    results: list[object] = []
    try:
        accept(store, "warm")
        threads = [threading.Thread(target=lambda index=index: results.append(accept(store, f"many-{index}")))
                   for index in range(100)]
        with server.frozen():
            for thread in threads:
                thread.start()
            time.sleep(0.5)  # every claim is now waiting on a connection that the frozen server does not answer
        for thread in threads:
            thread.join(timeout=10)
        assert results == [Acceptance(challenge=False)] * len(threads)
        store.ping()
        now = utcnow()
        store.issue_challenge("after-many", client_id="client", expires_at=now + timedelta(minutes=5), now=now)
    finally:
        store.close()


def claim_all_while_frozen(store: NonceStore, server: RedisServer, nonces: list[str], *,
                           frozen_seconds: float = 0.3) -> list[object]:
    """Start a claim per nonce while the server is frozen (the first is sent, the rest queue behind it), thaw
    it after ``frozen_seconds``, and return each claim's acceptance or error, in order."""
    results: list[object] = [None] * len(nonces)

    def claim(index: int) -> None:
        try:
            results[index] = accept(store, nonces[index])
        except StoreUnavailable as exc:
            results[index] = exc

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(len(nonces))]
    with server.frozen():
        for thread in threads:
            thread.start()
        time.sleep(frozen_seconds)
    for thread in threads:
        thread.join(timeout=10)
    return results


def test_claims_waiting_behind_one_go_together_on_one_connection(server: RedisServer) -> None:
    store = open_store(server.url, timeout_seconds=5.0)
    observer = server.client()
    try:
        accept(store, "warm")
        observer.ping()  # both connections are open before the counters start
        observer.config_resetstat()
        results = claim_all_while_frozen(store, server, [f"together-{index}" for index in range(16)])
        assert results == [Acceptance(challenge=False)] * 16
        stats = observer.info("stats")
        # No connection was opened for them: the store's one connection carried them all.
        assert stats["total_connections_received"] == 0
        assert observer.info("commandstats")["cmdstat_evalsha"]["calls"] == 16
        # The server read them in a few reads: the first claim alone, the 15 queued behind it in one write
        # (and the observer's INFO). Sent one by one, even on one connection, they would take 16 reads.
        assert stats["total_reads_processed"] <= 4, stats["total_reads_processed"]
        with pytest.raises(NonceReplayed):
            accept(store, "together-3")
    finally:
        observer.close()
        store.close()


def test_a_timeout_fails_the_claims_waiting_behind_it_unsent(server: RedisServer) -> None:
    store = open_store(server.url, timeout_seconds=0.5)
    try:
        accept(store, "warm")
        nonces = [f"behind-{index}" for index in range(8)]
        started = time.monotonic()
        results = claim_all_while_frozen(store, server, nonces, frozen_seconds=1.5)
        # One timeout for all of them, not one after the other (8 x 0.5 s).
        assert time.monotonic() - started < 3.0
        assert all(isinstance(result, StoreUnavailable) for result in results), results
        # The claims sent before the timeout are recorded once the server runs again: their documents are
        # refused. The ones that waited were never sent: they are accepted when tried again.
        outcomes: list[str] = []
        for nonce in nonces:
            try:
                accept(store, nonce)
                outcomes.append("accepted")
            except NonceReplayed:
                outcomes.append("replayed")
        assert "replayed" in outcomes
        assert "accepted" in outcomes
    finally:
        store.close()


def test_a_batch_the_server_has_no_script_for_is_sent_again_in_full(server: RedisServer) -> None:
    store = open_store(server.url, timeout_seconds=5.0)
    try:
        accept(store, "warm")
        server.client().script_flush()
        results = claim_all_while_frozen(store, server, [f"flushed-{index}" for index in range(8)])
        assert results == [Acceptance(challenge=False)] * 8
    finally:
        store.close()


#: Claims under gevent (monkey patched, as in a worker) on a server whose pid is argv[2]: ``accept(nonce)``
#: returns the acceptance, or "StoreUnavailable"; ``frozen()`` suspends the server for its ``with`` block.
_UNDER_GEVENT = textwrap.dedent("""
    import gevent.monkey
    gevent.monkey.patch_all()

    import contextlib
    import os
    import signal
    import sys
    from datetime import UTC, datetime, timedelta

    import gevent

    from attest_service.errors import StoreUnavailable
    from attest_service.nonces import open_store

    url, pid = sys.argv[1], int(sys.argv[2])
    store = open_store(url, timeout_seconds=5.0)

    def accept(nonce):
        now = datetime.now(UTC)
        try:
            return store.accept(nonce, client_id="client", expires_at=now + timedelta(minutes=5),
                                require_challenge=False, now=now, scope="vm")
        except StoreUnavailable:
            return "StoreUnavailable"

    @contextlib.contextmanager
    def frozen():
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    accept("warm")
""")


def under_gevent(server: RedisServer, scenario: str) -> list[str]:
    """What ``scenario`` (after :data:`_UNDER_GEVENT`) prints, split into words."""
    pid = server.client().info("server")["process_id"]
    script = _UNDER_GEVENT + textwrap.dedent(scenario)
    result = subprocess.run([sys.executable, "-c", script, server.url, str(pid)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_caller_killed_while_queued_does_not_hold_up_the_others(server: RedisServer) -> None:
    printed = under_gevent(server, """
        with frozen():
            first = gevent.spawn(accept, "sent-first")
            gevent.sleep(0.05)  # sent; the frozen server does not answer
            second, third = gevent.spawn(accept, "queued-second"), gevent.spawn(accept, "queued-third")
            gevent.sleep(0.05)  # both wait behind the first; the second would send the next batch
            second.kill()
        gevent.joinall([first, third], timeout=5)
        print(first.value, third.value)
    """)
    assert printed == ["Acceptance(challenge=False)"] * 2


def test_a_caller_killed_while_sending_fails_the_others_as_a_store_failure(server: RedisServer) -> None:
    printed = under_gevent(server, """
        with frozen():
            sender = gevent.spawn(accept, "sent")
            gevent.sleep(0.05)  # sent; the frozen server does not answer
            waiting = [gevent.spawn(accept, f"waiting-{index}") for index in range(3)]
            gevent.sleep(0.05)
            sender.kill()  # interrupted mid-read: the others must get a store failure, not its GreenletExit
            gevent.joinall(waiting, timeout=5)
        print(*[greenlet.value for greenlet in waiting], accept("after"))
    """)
    assert printed == ["StoreUnavailable"] * 3 + ["Acceptance(challenge=False)"]
