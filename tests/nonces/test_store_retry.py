"""A claim whose answer was lost: redis-py sends the whole script again, and the store must know its own success.

redis-py retries a command once when the connection breaks (the store allows exactly that retry, for a pooled
connection to a server that restarted). When the break comes after Redis ran the accept script, the first run
recorded the nonce and the retry finds the record: without a way to recognise it, the VM's first submission
would be answered 409 ``nonce_replayed``. Each claim carries a random token, stored in the record it writes;
the retry presents the same token and is answered with the acceptance it had won.

The lost answer is real: a TCP proxy in front of a real redis-server forwards the script call, waits until the
server has answered it, and closes both connections instead of relaying the answer.

When the answer is lost for good (the resend's too, or the read times out: redis-py does not resend then), or
when ``WAIT`` reports too few replicas, the claim ran but the service answers 503. The store then leaves a
retry mark (accept.lua), and the same caller's retry of the same document is accepted, confirming the claim
again; anyone else is refused as before, and so is this caller once its claim was confirmed.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import redis

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis.keys import retry_key
from tests.support.redis_server import LOOPBACK, RedisServer, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis

Unique = Callable[[str], str]
#: Seconds a replica may take to report itself in sync.
SYNC_TIMEOUT_SECONDS: Final = 15.0
#: Store timeout of the tests that wait for a replica (seconds).
REPLICATED_TIMEOUT_SECONDS: Final = 2.0
#: Seconds the store may take to leave a retry mark after a failed claim (it is written off the request's path).
MARK_TIMEOUT_SECONDS: Final = 5.0


class AnswerDroppingProxy:
    """A loopback TCP proxy to ``upstream``; once :meth:`arm`-ed, it loses the answer to the next script call.

    Every connection is relayed both ways. When armed, the first request containing ``EVAL`` (``EVALSHA``
    too) is forwarded; the server's answer to it is read and, unless it is an error (``NOSCRIPT``: the script
    did not run), both connections are closed without relaying it (with ``hold``: kept open, nothing more
    relayed on them, until the client gives up). The proxy disarms after ``times`` such answers.
    """

    def __init__(self, upstream: RedisServer) -> None:
        self._upstream = (upstream.host, upstream.port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.1)  # so that the accepting thread notices close() at once
        self.port: int = self._listener.getsockname()[1]
        self._armed = threading.Event()
        self._times = 1
        self._hold = False
        self.dropped = 0
        #: Called when an answer is lost, before the client can notice and send its retry.
        self.on_drop: Callable[[], None] | None = None
        self._closed = False
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` through the proxy."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def upstream_client(self) -> redis.Redis:
        """A client of the server itself, past the proxy."""
        return redis.Redis(host=self._upstream[0], port=self._upstream[1])

    def arm(self, *, times: int = 1, hold: bool = False) -> None:
        """Lose the answers to the next ``times`` script calls (closing the connection, or holding it open)."""
        self._times = times
        self._hold = hold
        self._armed.set()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self._upstream)
            thread = threading.Thread(target=self._relay, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        awaiting_answer = False
        with client, upstream, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in selector.select(timeout=0.1):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is client:
                        if self._armed.is_set() and b"EVAL" in data:
                            awaiting_answer = True
                        upstream.sendall(data)
                        continue
                    if awaiting_answer and not data.startswith(b"-"):
                        # The server ran the script and answered: the client never hears of it.
                        self.dropped += 1
                        if self.dropped >= self._times:
                            self._armed.clear()
                        if self.on_drop is not None:
                            self.on_drop()
                        if not self._hold:
                            return
                        selector.unregister(upstream)  # nothing more from the server reaches this client
                        awaiting_answer = False
                        continue
                    awaiting_answer = False
                    client.sendall(data)

    def close(self) -> None:
        """Stop accepting and relaying."""
        self._closed = True
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    # A replica is synchronised at once, not after the default five seconds of waiting for others to join; the
    # master's periodic PING to its replicas, which moves the replication offset, stays out of the tests.
    with redis_server(tmp_path / "redis", extra_args=("--repl-diskless-sync-delay", "0",
                                                      "--repl-ping-replica-period", "3600")) as running:
        yield running


@contextlib.contextmanager
def proxied_store(upstream: RedisServer, *, min_replicas: int = 0) -> Iterator[tuple[AnswerDroppingProxy, NonceStore]]:
    proxy = AnswerDroppingProxy(upstream)
    # With a replica to wait for, a longer timeout than the default: WAIT gets half of it, and on a loaded
    # machine a replica's acknowledgement can take longer than the default's 400 ms.
    timeout = REPLICATED_TIMEOUT_SECONDS if min_replicas else TIMEOUT_SECONDS
    store = open_store(proxy.url, timeout_seconds=timeout, min_replicas=min_replicas)
    try:
        yield proxy, store
    finally:
        store.close()
        proxy.close()


def accept(store: NonceStore, nonce: str, *, require_challenge: bool = False, client_id: str = "client",
           scope: str | None = None) -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id=client_id, expires_at=now + timedelta(minutes=10),
                        require_challenge=require_challenge, now=now, scope=scope)


def test_a_claim_whose_answer_was_lost_is_accepted_on_the_retry(server: RedisServer, unique: Unique) -> None:
    with proxied_store(server) as (proxy, store):
        store.ping()
        nonce = unique("lost-answer")
        proxy.arm()
        assert accept(store, nonce) == Acceptance(challenge=False)
        assert proxy.dropped == 1, "the answer was not lost: the test proved nothing"
        # Another claim of the same nonce is a replay, as ever.
        with pytest.raises(NonceReplayed):
            accept(store, nonce)


def test_a_consumed_challenge_whose_answer_was_lost_is_accepted_on_the_retry(server: RedisServer,
                                                                             unique: Unique) -> None:
    with proxied_store(server) as (proxy, store):
        nonce = unique("lost-challenge")
        store.issue_challenge(nonce, client_id="client", expires_at=utcnow() + timedelta(minutes=5))
        proxy.arm()
        assert accept(store, nonce, require_challenge=True) == Acceptance(challenge=True)
        assert proxy.dropped == 1
        with pytest.raises(NonceReplayed):
            accept(store, nonce, require_challenge=True)


@pytest.fixture
def replica(server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "replica", extra_args=("--replicaof", server.host, str(server.port))) as running:
        wait_in_sync(server)
        yield running


def wait_in_sync(master: RedisServer) -> None:
    deadline = time.monotonic() + SYNC_TIMEOUT_SECONDS
    client = master.client()
    try:
        while client.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica did not come online"
            time.sleep(0.05)
    finally:
        client.close()


def test_a_replicated_claim_whose_answer_was_lost_is_accepted_on_the_retry(
        server: RedisServer, replica: RedisServer, unique: Unique) -> None:
    # With a replica required, the retry resends the script and its WAIT: the acceptance it recognises must
    # be confirmed by the replica like any other.
    with proxied_store(server, min_replicas=1) as (proxy, store):
        nonce = unique("lost-replicated")
        proxy.arm()
        assert accept(store, nonce) == Acceptance(challenge=False)
        assert proxy.dropped == 1
        with pytest.raises(NonceReplayed):
            accept(store, nonce)
        client = replica.client()
        try:
            assert client.dbsize() == 1  # the record reached the replica
        finally:
            client.close()


def test_a_recognised_retry_still_waits_for_its_replica(
        server: RedisServer, replica: RedisServer, unique: Unique) -> None:
    # The retry runs on a new connection, and WAIT waits for what that connection wrote. Redis 7.0 moves a
    # connection's WAIT offset on every command, so there the retry's WAIT covers the first run's record
    # anyway; current Redis sources move it only on a command that replicated something, and a retry that
    # wrote nothing would have WAIT count the frozen replica at once. The recognised retry rewrites its
    # record for that reason: the replication stream grows on the retried run by more than its WAIT's own
    # request for acknowledgements (measured beside it), which is what shows the rewrite on any server.
    observer = server.client()
    offsets: list[int] = []

    def offset() -> int:
        return int(observer.info("replication")["master_repl_offset"])

    with proxied_store(server, min_replicas=1) as (proxy, store):
        store.ping()
        nonce = unique("lost-unconfirmed")
        proxy.on_drop = lambda: offsets.append(offset())
        with replica.frozen():
            proxy.arm()
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                accept(store, nonce)
            assert proxy.dropped == 1
            retried = offset() - offsets[0]
            before_wait = offset()
            observer.execute_command("WAIT", 1, 50)  # a WAIT alone, nothing written: what it adds
            waited = offset() - before_wait
        assert retried > waited, f"the retried run added {retried} bytes to the stream, a bare WAIT {waited}"
        observer.close()
        wait_in_sync(server)
        # Nothing was accepted; the record left on the primary refuses everyone else, and this caller's retry of
        # the same document confirms it (now that the replica answers) once.
        with pytest.raises(NonceReplayed):
            accept(store, nonce, client_id="someone-else")
        assert accept(store, nonce) == Acceptance(challenge=False)
        with pytest.raises(NonceReplayed):
            accept(store, nonce)


# --- the answer lost for good: 503, then the same caller's retry ------------------------------------------------

#: Ways to lose the answer of a claim that ran: the read times out (redis-py sends nothing again), or the
#: connection drops the reply both times (the claim and redis-py's one resend).
LOST_FOR_GOOD = {"timeout": {"hold": True}, "dropped twice": {"times": 2}}


def _lose(proxy: AnswerDroppingProxy, store: NonceStore, how: dict[str, Any], nonce: str, **claim: Any) -> None:
    """Claim ``nonce`` with its answer lost for good (503), then wait until the store left the retry mark.

    After a timeout or a broken connection the mark is written off the request's path (Redis may be hung); a
    caller retrying after the usual backoff finds it, and so does the test once it is there.
    """
    proxy.arm(**how)
    with pytest.raises(StoreUnavailable):
        accept(store, nonce, **claim)
    assert proxy.dropped >= 1, "no answer was lost: the test proved nothing"
    mark = retry_key(nonce, claim.get("client_id", "client"), claim.get("scope"))
    client = proxy.upstream_client()
    try:
        deadline = time.monotonic() + MARK_TIMEOUT_SECONDS
        while not client.exists(mark):
            assert time.monotonic() < deadline, "the retry mark was never written"
            time.sleep(0.01)
    finally:
        client.close()


@pytest.mark.parametrize("how", LOST_FOR_GOOD.values(), ids=LOST_FOR_GOOD.keys())
def test_a_claim_answered_503_is_accepted_on_the_same_callers_retry_and_only_then(
        server: RedisServer, unique: Unique, how: dict[str, Any]) -> None:
    with proxied_store(server) as (proxy, store):
        store.ping()
        nonce = unique("lost-for-good")
        _lose(proxy, store, how, nonce)
        # The claim ran: anyone else is refused, whoever they are.
        with pytest.raises(NonceReplayed):
            accept(store, nonce, client_id="someone-else")
        # The same caller resubmitting the same document is accepted: its first submission never got an answer.
        assert accept(store, nonce) == Acceptance(challenge=False)
        # Confirmed now: a further submission is a replay, for this caller too.
        with pytest.raises(NonceReplayed):
            accept(store, nonce)
        with pytest.raises(NonceReplayed):
            accept(store, nonce, client_id="someone-else")


@pytest.mark.parametrize("how", LOST_FOR_GOOD.values(), ids=LOST_FOR_GOOD.keys())
def test_a_consumed_challenge_answered_503_is_accepted_on_the_same_callers_retry(
        server: RedisServer, unique: Unique, how: dict[str, Any]) -> None:
    with proxied_store(server) as (proxy, store):
        nonce = unique("lost-challenge-for-good")
        store.issue_challenge(nonce, client_id="client", expires_at=utcnow() + timedelta(minutes=5))
        _lose(proxy, store, how, nonce, require_challenge=True)
        with pytest.raises(NonceReplayed):
            accept(store, nonce, require_challenge=True, client_id="someone-else")
        assert accept(store, nonce, require_challenge=True) == Acceptance(challenge=True)
        with pytest.raises(NonceReplayed):
            accept(store, nonce, require_challenge=True)


def test_a_vm_scoped_claim_answered_503_is_accepted_on_the_same_callers_retry(server: RedisServer,
                                                                             unique: Unique) -> None:
    # Caller-chosen nonces are claimed per VM: the retry must find its VM's entry in the list (and, past the
    # list's size, its VM's own key), and leave the other VMs' claims alone.
    with proxied_store(server) as (proxy, store):
        nonce = unique("lost-scoped")
        vms = [f"vm-{index}" for index in range(10)]
        for index, vm in enumerate(vms):
            if index not in (3, 9):
                assert accept(store, nonce, scope=vm) == Acceptance(challenge=False)
                continue
            # The fourth VM's claim goes into the seen value's list, the tenth's into a key of its own.
            _lose(proxy, store, {"hold": True}, nonce, scope=vm)
            with pytest.raises(NonceReplayed):
                accept(store, nonce, scope=vm, client_id="someone-else")
            assert accept(store, nonce, scope=vm) == Acceptance(challenge=False)
            with pytest.raises(NonceReplayed):
                accept(store, nonce, scope=vm)
        for vm in vms:
            with pytest.raises(NonceReplayed):
                accept(store, nonce, scope=vm)


def test_a_claim_refused_for_too_few_replicas_is_accepted_on_the_same_callers_retry(
        server: RedisServer, replica: RedisServer, unique: Unique) -> None:
    with proxied_store(server, min_replicas=1) as (_, store):
        nonce = unique("frozen-replica")
        with replica.frozen():
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                accept(store, nonce)
            with pytest.raises(NonceReplayed):
                accept(store, nonce, client_id="someone-else")
            # Still no replica: the retry is refused the same way, and may be retried again.
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                accept(store, nonce)
        wait_in_sync(server)
        assert accept(store, nonce) == Acceptance(challenge=False)
        with pytest.raises(NonceReplayed):
            accept(store, nonce)
        with pytest.raises(NonceReplayed):
            accept(store, nonce, client_id="someone-else")
