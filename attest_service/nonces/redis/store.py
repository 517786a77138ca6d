"""The nonce store in Redis: each decision one Lua script, and any Redis failure a refusal.

Records expire with ``PXAT`` at absolute instants computed from the caller's clock. Any Redis failure
(refused or reset connection, timeout, cluster down, a read-only replica during failover) becomes
:class:`~attest_service.errors.StoreUnavailable`: nothing is accepted without an answer. Connections are
made lazily and remade on the next call, so the store recovers by itself when Redis comes back.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from attest_service.errors import NonceReplayed, NonceUnknown, StoreUnavailable
from attest_service.nonces.redis.connection import DirectConnections, RedisClient
from attest_service.nonces.redis.keys import KEY_PREFIX, challenge_key, hash_tag, rate_key, tagged_retry_key
from attest_service.nonces.redis.scripts import ACCEPT_SCRIPT, MAX_LISTED_SCOPES, RATE_SCRIPT
from attest_service.nonces.store import (
    DEFAULT_CHALLENGE_TTL_SECONDS,
    Acceptance,
    RateWindow,
    check_nonce,
    check_scope,
    epoch_ms,
    replayed,
    scope_tag,
    seen_ttl_ms,
)

_LOG: Final = logging.getLogger(__name__)

#: Random bytes of a claim token (96 bits: a replayed document cannot present another claim's token).
CLAIM_TOKEN_BYTES: Final = 12
#: How long the same caller may retry a claim whose answer was lost, in seconds (at most the record's lifetime).
RETRY_WINDOW_SECONDS: Final = 600
#: Retry marks waiting to be written after failed claims; beyond it the oldest are dropped (their retries get 409).
MAX_PENDING_MARKS: Final = 1024

_T = TypeVar("_T")


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _MarkWriter:
    """Writes retry marks off the request's path, one after the other, on a thread that lives while there are any.

    After a timeout or a broken connection Redis may be hung: writing the mark before answering would make
    that request cost a second timeout. A mark that cannot be written is dropped (its retry gets 409).
    """

    def __init__(self, write: Callable[[str, str, int], None]) -> None:
        self._write = write
        self._pending: deque[tuple[str, str, int]] = deque(maxlen=MAX_PENDING_MARKS)
        self._lock = threading.Lock()
        self._running = False
        self._closed = False

    def submit(self, mark: str, token: str, px: int) -> None:
        """Queue a mark; starts the writing thread (a greenlet under gevent) when none runs."""
        with self._lock:
            if self._closed:
                return
            self._pending.append((mark, token, px))
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="attest-retry-marks", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._closed:
                    self._running = False
                    return
                mark, token, px = self._pending.popleft()
            try:
                self._write(mark, token, px)
            except StoreUnavailable:
                pass  # Redis cannot take it either: that caller's retry is refused, as before (fail closed)
            except Exception:  # noqa: BLE001 - a thread of its own: nothing above it would see the error
                _LOG.exception("leaving a retry mark in the nonce store failed")

    def close(self) -> None:
        """Drop the marks not written yet; no more are taken."""
        with self._lock:
            self._closed = True
            self._pending.clear()


class RedisNonceStore:
    """:class:`~attest_service.nonces.store.NonceStore` in Redis, shared by every replica using the same server.

    ``connect`` makes the redis-py client; it is called on first use and again after a failure to create it
    (a cluster client contacts the cluster when it is made), never at construction.
    """

    def __init__(
        self,
        connect: Callable[[], RedisClient],
        *,
        description: str,
        challenge_ttl_seconds: float = DEFAULT_CHALLENGE_TTL_SECONDS,
        min_replicas: int = 0,
        wait_timeout_ms: int = 0,
    ) -> None:
        self._connect = connect
        self._min_replicas = min_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._description = description
        self._challenge_ttl_seconds = challenge_ttl_seconds
        self._client: RedisClient | None = None
        self._direct: DirectConnections | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._marks = _MarkWriter(self._write_mark)

    def __repr__(self) -> str:
        return f"RedisNonceStore({self._description!r})"

    # --- plumbing ----------------------------------------------------------------------------------

    def _client_or_connect(self) -> RedisClient:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the nonce store was closed")
            if self._client is None:
                client = self._connect()
                # The cluster client routes each key to its node itself; the others' connections are used directly.
                self._direct = None if isinstance(client, RedisCluster) else DirectConnections(client)
                self._client = client
            return self._client

    def _call(self, operation: Callable[[RedisClient], _T]) -> _T:
        """Run ``operation``; every redis-py failure becomes :class:`StoreUnavailable` (fail closed)."""
        try:
            return operation(self._client_or_connect())
        except (RedisError, RedisClusterException) as exc:
            raise StoreUnavailable(f"nonce store {self._description} unavailable: {type(exc).__name__}: {exc}") from exc

    # --- NonceStore ----------------------------------------------------------------------------------

    def issue_challenge(self, nonce: str, *, client_id: str, expires_at: datetime,
                        now: datetime | None = None) -> None:  # noqa: ARG002 - Redis expires keys itself
        """``SET attest:{tag}:ch "<expiry>|<client>" NX PXAT <expiry>``; an existing challenge refuses it."""
        check_nonce(nonce, client_id)
        expires_ms = epoch_ms(expires_at)
        created = self._call(
            lambda client: client.set(challenge_key(nonce), f"{expires_ms}|{client_id}", nx=True, pxat=expires_ms)
        )
        if not created:
            raise NonceReplayed(f"nonce {nonce!r} was already issued as a challenge")

    def accept(
        self, nonce: str, *, client_id: str, expires_at: datetime, require_challenge: bool, now: datetime,
        scope: str | None = None,
    ) -> Acceptance:
        """One Lua script decides and records (see the protocol for the rules)."""
        check_nonce(nonce, client_id)
        check_scope(scope)
        ttl_ms = seen_ttl_ms(expires_at=expires_at, now=now, challenge_ttl_seconds=self._challenge_ttl_seconds)
        tag = hash_tag(nonce)
        seen = f"{KEY_PREFIX}:{{{tag}}}:seen"
        scope_digest = "" if scope is None else scope_tag(scope)
        scoped = f"{seen}:{scope_digest}" if scope_digest else seen
        mark = tagged_retry_key(tag, client_id, scope_digest)
        keys = [f"{KEY_PREFIX}:{{{tag}}}:ch", seen, scoped, mark]
        # One token per call of accept(), the same in redis-py's resend of the script (see accept.lua).
        token = secrets.token_urlsafe(CLAIM_TOKEN_BYTES)
        args = [client_id, "1" if require_challenge else "0", str(ttl_ms), token, scope_digest, MAX_LISTED_SCOPES]
        try:
            if self._min_replicas:
                reply, replicas = self._call(lambda client: self._run_replicated(client, keys, args))
            else:
                reply, replicas = self._call(lambda client: ACCEPT_SCRIPT.run(client, keys, args, self._direct)), 0
        except StoreUnavailable:
            # The script may have run and recorded this claim, its answer lost on the way back. Redis may be
            # hung, so the mark is written off this request's path.
            self._marks.submit(mark, token, min(ttl_ms, RETRY_WINDOW_SECONDS * 1000))
            raise
        outcome = [_text(item) for item in reply]
        match outcome:
            case ["challenge" | "seen"] | ["accepted", _] if replicas < self._min_replicas:
                # The record is on the primary only: a failover now would forget it and let the document in
                # again. Fail closed; the record stays, refusing everyone else, and the mark lets this caller's
                # retry of the same document confirm it (accept.lua).
                # The connection just answered WAIT: the mark goes now, before the caller can retry.
                with contextlib.suppress(StoreUnavailable):
                    self._write_mark(mark, token, min(ttl_ms, RETRY_WINDOW_SECONDS * 1000))
                raise StoreUnavailable(f"nonce store {self._description}: {replicas} of {self._min_replicas} "
                                       f"replicas confirmed the record within {self._wait_timeout_ms} ms")
            case ["challenge"]:
                return Acceptance(challenge=True)
            case ["seen"]:
                return Acceptance(challenge=False)
            case ["accepted", was_challenge]:
                # This very claim, resent after its answer was lost: the acceptance it had won.
                return Acceptance(challenge=was_challenge == "1")
            case ["replayed", was_challenge, seen_client_id]:
                raise replayed(
                    nonce, client_id=client_id, seen_client_id=seen_client_id, seen_challenge=was_challenge == "1"
                )
            case ["foreign"]:
                raise NonceUnknown(f"nonce {nonce!r} was not issued to client {client_id!r}")
            case ["unknown"]:
                raise NonceUnknown(f"nonce {nonce!r} is not a live challenge: never issued, expired or consumed")
        raise StoreUnavailable(f"nonce store {self._description} gave an unexpected answer: {outcome!r}")

    def _write_mark(self, mark: str, token: str, px: int) -> None:
        """Leave the retry mark of a claim answered 503 that may have been recorded (see accept.lua).

        Best effort: when Redis cannot take it either, the caller's retry is refused as a replay, as before
        (fail closed). A mark whose claim never ran names a token no record holds, and admits nothing.
        """
        self._call(lambda client: client.set(mark, token, px=px))

    def _run_replicated(self, client: RedisClient, keys: Sequence[str],
                        args: Sequence[str | int]) -> tuple[list[bytes | int], int]:
        """The accept script, then ``WAIT`` on the same connection (WAIT counts that connection's writes)."""
        if isinstance(client, RedisCluster):
            node_client = client.get_redis_connection(client.get_node_from_key(keys[0]))
            try:
                return self._pipeline_accept(node_client, keys, args)
            except RedisError:
                # Talking to one node directly bypasses the cluster client's own MOVED handling, so after a
                # failover its slot map would stay stale: refresh it for the next request, fail this one.
                client.nodes_manager.initialize()
                raise
        return self._pipeline_accept(client, keys, args)

    def _pipeline_accept(self, client: redis.Redis, keys: Sequence[str],
                         args: Sequence[str | int]) -> tuple[list[bytes | int], int]:
        pipe = client.pipeline(transaction=False)
        # EVAL rather than EVALSHA: a pipeline cannot fall back on NOSCRIPT mid-way, and the script is small.
        pipe.execute_command("EVAL", ACCEPT_SCRIPT.source, len(keys), *keys, *args)
        pipe.execute_command("WAIT", self._min_replicas, self._wait_timeout_ms)
        reply, replicas = pipe.execute()
        if not isinstance(reply, list) or not isinstance(replicas, int):
            raise StoreUnavailable(f"unexpected reply from the nonce store: {reply!r}, {replicas!r}")
        return reply, replicas

    def hit_rate(self, client_id: str, *, limit: int, window_seconds: int, now: datetime, count: int = 1) -> int:
        """One Lua script reads both windows and counts up to ``count`` requests, as many as fit."""
        if limit <= 0:
            raise ValueError(f"rate limit must be positive, got {limit}")
        if count <= 0:
            raise ValueError(f"rate count must be positive, got {count}")
        window = RateWindow.at(now, window_seconds)
        keys = [rate_key(client_id, window.index - 1), rate_key(client_id, window.index)]
        args = [window.window_ms, window.elapsed_ms, limit, window.expires_ms, count]
        reply = self._call(lambda client: RATE_SCRIPT.run(client, keys, args, self._direct))
        try:
            granted, previous, current = (int(item) for item in reply)
        except (ValueError, TypeError) as exc:
            raise StoreUnavailable(f"unexpected reply from the nonce store's rate script: {reply!r}") from exc
        if granted <= 0:
            raise window.refusal(previous=previous, current=current, limit=limit)
        if granted > count:
            raise StoreUnavailable(f"the nonce store's rate script counted {granted} of {count} requests")
        return granted

    def ping(self) -> None:
        """``PING`` (on a cluster: every primary)."""
        self._call(lambda client: client.ping())

    def close(self) -> None:
        """Close the client's connections; later calls raise :class:`StoreUnavailable`."""
        self._marks.close()
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        if client is not None:
            client.close()
