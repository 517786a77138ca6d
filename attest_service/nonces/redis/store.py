"""Nonce store in Redis: standalone, behind Sentinel, or a Redis Cluster.

Each decision is one Lua script, which Redis runs atomically. The challenge and seen keys of one nonce share a
hash tag (``attest:{<digest>}:ch`` and ``attest:{<digest>}:seen``), so they live in one cluster slot and one
script may touch both. The tag is the SHA-256 of the nonce rather than the nonce itself: a nonce is chosen by
whoever called IMDS, and braces in it would otherwise move the tag. Records expire with ``PXAT`` at absolute
instants computed from the caller's clock.

Any Redis failure (refused or reset connection, timeout, cluster down, a read-only replica during failover)
becomes :class:`~attest_service.errors.StoreUnavailable`: nothing is accepted without an answer. Connections are
made lazily and remade on the next call, so the store recovers by itself when Redis comes back.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final, TypeAlias, TypeVar
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

from attest_service.errors import NonceReplayed, NonceUnknown, StoreUnavailable
from attest_service.nonces.store import (
    DEFAULT_CHALLENGE_TTL_SECONDS,
    REDIS_SCHEMES,
    Acceptance,
    RateWindow,
    check_nonce,
    check_scope,
    epoch_ms,
    redact,
    replayed,
    scope_tag,
    seen_ttl_ms,
)

#: VMs listed in a caller-chosen nonce's seen value; further VMs of that nonce get a key each (see _ACCEPT_LUA).
MAX_LISTED_SCOPES: Final = 8
#: Random bytes of a claim token (96 bits: a replayed document cannot present another claim's token).
CLAIM_TOKEN_BYTES: Final = 12
#: Prefix of every key this service writes.
KEY_PREFIX: Final = "attest"
DEFAULT_REDIS_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
#: URL schemes :func:`redis_store` understands.
SCHEMES: Final = REDIS_SCHEMES
#: Replicas that must confirm an acceptance when none is configured, by URL scheme. Sentinel and Cluster fail
#: over to a replica, which has only what reached it: a record on the primary alone would be forgotten and its
#: document accepted again. A single server (redis://, rediss://) has no failover to survive; if it does have
#: replicas that an operator promotes by hand, configure the number explicitly.
DEFAULT_MIN_REPLICAS: Final = MappingProxyType({"redis": 0, "rediss": 0, "redis+sentinel": 1, "redis+cluster": 1})

RedisClient: TypeAlias = "redis.Redis | RedisCluster"
_T = TypeVar("_T")
_LOG: Final = logging.getLogger(__name__)

# KEYS: challenge key, seen key, the VM's own seen key (the seen key again when there is no scope).
# ARGV: client id, "1" when a challenge is required, seen lifetime (ms, relative: an absolute PXAT from the
# caller's clock would vanish at once on a server whose clock runs ahead), claim token, scope tag ("" for none).
# Seen values, one key per nonce:
#   "C|<token>|<client id>"  a consumed challenge: refuses every later claim;
#   "N|<token>|<client id>"  a caller-chosen nonce claimed without a scope: refuses every later claim;
#   "V|<tag>:<token>[,<tag>:<token>...]"  a caller-chosen nonce claimed for each VM listed (tag: the scope's
#                            digest), at most MAX_LISTED_SCOPES of them: refuses later claims of those VMs
#                            only, and claims without a scope;
#   "W|<tag>:<token>,..."    the same list once full: further VMs of the nonce get a key each
#                            (attest:{<digest>}:seen:<tag>, holding the token), with its own lifetime, so that
#                            a nonce many VMs share (a vendor's fixed nonce) costs one small key per VM and
#                            O(1) per claim, not a value that grows with the fleet and is rewritten each time.
#                            The previous release reads "V" lists but not these keys; to it "W" is an unknown
#                            kind, which it refuses as replayed, so a rolling upgrade cannot accept a VM twice;
#   "0|<client id>", "1|<client id>"  written before claims carried a token or a scope: refuse every claim.
# Releases before scoping read any value as "replayed", so during a rolling upgrade they refuse what this one
# accepted (as they always did), and this one refuses what they accepted.
# Challenge values: "<expires ms>|<client id>".
# The token is random per claim: redis-py resends the whole script when the connection breaks, and a resent
# claim that finds its own token was the one that won (its first answer was lost). It rewrites its record, so
# that a WAIT after the script, on the retry's new connection, covers the record too.
# A record that replaces or extends another keeps the longer of the two lifetimes.
# Returns {"replayed", <1|0 challenge>, <client id>} | {"accepted", <1|0>} (a resent claim) | {"challenge"} |
# {"foreign"} | {"unknown"} | {"seen"}.
_ACCEPT_LUA: Final = """
local function record(value, previous)
  local ttl = tonumber(ARGV[3])
  if previous then
    local left = redis.call('PTTL', KEYS[2])
    if left > ttl then ttl = left end
  end
  redis.call('SET', KEYS[2], value, 'PX', ttl)
end
local seen = redis.call('GET', KEYS[2])
local listed = 0
if seen then
  local kind = string.sub(seen, 1, 1)
  if kind == 'C' or kind == 'N' then
    local sep = string.find(seen, '|', 3, true)
    local challenge = kind == 'C' and '1' or '0'
    if string.sub(seen, 3, sep - 1) == ARGV[4] then
      redis.call('SET', KEYS[2], seen, 'KEEPTTL')
      return {'accepted', challenge}
    end
    return {'replayed', challenge, string.sub(seen, sep + 1)}
  elseif kind == 'V' or kind == 'W' then
    if ARGV[5] == '' then
      return {'replayed', '0', ''}
    end
    local at = string.find(seen, ARGV[5] .. ':', 3, true)
    if at then
      local entry = ARGV[5] .. ':' .. ARGV[4]
      if string.sub(seen, at, at + #entry - 1) == entry then
        redis.call('SET', KEYS[2], seen, 'KEEPTTL')
        return {'accepted', '0'}
      end
      return {'replayed', '0', ''}
    end
    local own = redis.call('GET', KEYS[3])
    if own then
      if own == ARGV[4] then
        redis.call('SET', KEYS[3], own, 'KEEPTTL')
        return {'accepted', '0'}
      end
      return {'replayed', '0', ''}
    end
    if kind == 'W' then
      listed = -1
    else
      local _, commas = string.gsub(seen, ',', ',')
      listed = commas + 1
    end
  else
    local sep = string.find(seen, '|', 1, true)
    return {'replayed', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
  end
end
local challenge = redis.call('GET', KEYS[1])
if challenge then
  local sep = string.find(challenge, '|', 1, true)
  if string.sub(challenge, sep + 1) ~= ARGV[1] then
    return {'foreign'}
  end
  redis.call('DEL', KEYS[1])
  record('C|' .. ARGV[4] .. '|' .. ARGV[1], seen)
  return {'challenge'}
end
if ARGV[2] == '1' then
  return {'unknown'}
end
if ARGV[5] == '' then
  record('N|' .. ARGV[4] .. '|' .. ARGV[1], seen)
elseif not seen then
  record('V|' .. ARGV[5] .. ':' .. ARGV[4], seen)
elseif listed >= 0 and listed < tonumber(ARGV[6]) then
  record(seen .. ',' .. ARGV[5] .. ':' .. ARGV[4], seen)
else
  -- The list is full: this VM's claim gets a key of its own, and the list, marked full ("W"), lives as long
  -- as the longest claim.
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
  record('W' .. string.sub(seen, 2), seen)
end
return {'seen'}
"""

# KEYS: previous window's counter, current window's counter.
# ARGV: window length (ms), time elapsed in the current window (ms), limit, expiry of the current counter (ms),
# requests asked for.
# The room is RateWindow.room, in integers (every product stays below 2^53, exact in Lua's doubles).
# Returns {requests counted (0: refused), previous count, current count before these requests}.
_RATE_LUA: Final = """
local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local window = tonumber(ARGV[1])
local room = math.floor((tonumber(ARGV[3]) * window - previous * (window - tonumber(ARGV[2]))) / window) - current
local granted = math.min(room, tonumber(ARGV[5]))
if granted < 1 then
  return {0, previous, current}
end
redis.call('INCRBY', KEYS[2], granted)
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
return {granted, previous, current}
"""


def _tag(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def challenge_key(nonce: str) -> str:
    """Key of the challenge record of ``nonce``."""
    return f"{KEY_PREFIX}:{{{_tag(nonce)}}}:ch"


def seen_key(nonce: str) -> str:
    """Key of the seen record of ``nonce`` (same hash tag, hence same cluster slot, as its challenge).

    One key per nonce, whatever the scopes it was claimed in: the per-VM claims are listed in its value.
    """
    return f"{KEY_PREFIX}:{{{_tag(nonce)}}}:seen"


def scoped_seen_key(nonce: str, scope: str) -> str:
    """Key of one VM's claim of a caller-chosen nonce, once the nonce's seen value lists its most VMs."""
    return f"{KEY_PREFIX}:{{{_tag(nonce)}}}:seen:{scope_tag(scope)}"


def rate_key(client_id: str, window_index: int) -> str:
    """Key of one fixed rate window of ``client_id`` (all windows of a client share a slot)."""
    return f"{KEY_PREFIX}:rate:{{{_tag(client_id)}}}:{window_index}"


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def pack_command(*args: str | int) -> bytes:
    """One command in RESP, the Redis protocol: an array of bulk strings (text as UTF-8, as redis-py sends it)."""
    parts = [arg.encode("utf-8") if isinstance(arg, str) else str(arg).encode("ascii") for arg in args]
    return b"*%d\r\n%b" % (len(parts), b"".join(b"$%d\r\n%b\r\n" % (len(part), part) for part in parts))


#: Commands sent together at most, in one write; more waiting ones go in the following batches.
MAX_BATCH: Final = 64


class _Queued:
    """One command waiting for its batch: filled in by whichever caller sends that batch."""

    __slots__ = ("answered", "done", "error", "lead", "packed", "reply")

    def __init__(self, packed: bytes, done: threading.Event | None) -> None:
        self.packed = packed
        #: Set when answered or when this caller is to send the next batch; None for a caller that sends at once.
        self.done = done
        self.answered = False
        self.lead = False
        self.reply: object = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        if self.done is not None:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        # Each caller raises an exception object of its own (callers in other threads or greenlets add their
        # own tracebacks to it).
        self.error = copy.copy(error)
        self.answered = True

    def result(self) -> object:
        if not self.answered:
            raise RedisConnectionError("the command was not sent")  # never expected: fail closed regardless
        if self.error is not None:
            raise self.error
        return self.reply


class DirectConnections:
    """One connection of a redis-py client's pool, used directly for the store's two per-request scripts.

    Why not ``execute_command``: around the one socket exchange it checks a connection out of the pool
    with a readiness poll, wraps the call in its retry and observability layers, packs the command
    argument by argument and looks up response callbacks; that costs 43 us of CPU per script here,
    against 18 us for the same exchange on a held connection (and more under gevent, where each of those
    layers also yields). The connection is still redis-py's (made by the client's pool, so Sentinel's
    follows the master), and replies are read by its parser.

    Commands that arrive while a batch is out wait for it and then go together, in one write, as the next
    batch (group commit); the replies come back in order. Under load a worker's concurrent claims then cost
    Redis one read and one write between them instead of one each: Redis's CPU per claim was 37.5 us one at
    a time, 22.5 us two at a time and 13.7 us four at a time. Each script is atomic on its own, so sending
    several at once changes no outcome.

    Failure handling is the client's: one immediate resend of the commands not yet answered, on the same
    connection reconnected, when it broke (the scripts recognise their own resend); none on a timeout. A
    batch that fails also fails the commands waiting behind it, unsent: Redis is not answering, and they
    would only wait for their own failure in turn. A caller also stops waiting for its batch after twice the
    connection's timeouts.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: ConnectionInterface | None = None
        self._queue: deque[_Queued] = deque()
        self._sending = False
        self._lock = threading.Lock()
        self._closed = False
        options = self._pool.connection_kwargs
        timeouts = [options.get("socket_timeout"), options.get("socket_connect_timeout")]
        known = [float(value) for value in timeouts if value]
        #: How long a caller waits for the batches before its own to be answered (None: as long as they take).
        self._wait_seconds = 2 * sum(known) if known else None

    def run(self, packed: bytes) -> object:
        """Send one packed command and return its reply; a Redis error reply is raised (ResponseError)."""
        with self._lock:
            if self._closed:
                raise RedisConnectionError("the nonce store was closed")
            lead = not self._sending
            # Only a caller that waits needs an event to wait on (making one is a fifth of this method's CPU).
            done = None if lead else threading.Event()
            queued = _Queued(packed, done)
            self._queue.append(queued)
            self._sending = True
        if done is not None:
            # The caller sending the batch in flight answers this one, or hands the next batch to it.
            try:
                woken = done.wait(self._wait_seconds)
            except BaseException:
                self._leave(queued)  # killed while waiting (a greenlet at shutdown): nobody may wait for it
                raise
            if not woken and self._leave(queued):
                raise RedisTimeoutError(f"no answer to the commands sent before this one in {self._wait_seconds} s")
            if not woken:
                done.wait()  # already sent: its own batch is bounded by the connection's timeouts
            lead = queued.lead
        if lead:
            self._send_batch()
        return queued.result()

    def _leave(self, queued: _Queued) -> bool:
        """Take ``queued`` out of the queue if it is still there (unsent); returns whether it was there.

        When it was to send the next batch, the next caller in the queue sends it.
        """
        with self._lock:
            if queued not in self._queue:
                return False
            self._queue.remove(queued)
            if queued.lead:
                self._hand_on()
            return True

    def _hand_on(self) -> None:
        # Called with the lock held: the next batch is sent by the first of its callers, so nobody waits for
        # others' answers.
        if self._queue:
            self._queue[0].lead = True
            self._queue[0].wake()
        else:
            self._sending = False

    def _send_batch(self) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
        failure: BaseException | None = None
        try:
            self._exchange(batch)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if failure is not None and not isinstance(failure, Exception):
                # Only this caller was interrupted (GreenletExit, KeyboardInterrupt): the others get an
                # ordinary store failure, not its interruption.
                failure = RedisConnectionError("the caller sending this batch was interrupted")
            for queued in batch:
                if not queued.answered:
                    queued.fail(failure or RedisConnectionError("the command was not answered"))
                queued.wake()
            with self._lock:
                waiting = list(self._queue) if failure is not None else []
                if failure is not None:
                    self._queue.clear()
                self._hand_on()
            for queued in waiting:
                queued.fail(RedisConnectionError(f"a command sent before this one failed: {failure}"))
                queued.wake()

    def _exchange(self, batch: list[_Queued]) -> None:
        """Send ``batch`` in one write and read its replies; raises when the exchange failed."""
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self._pool.make_connection()
        except BaseException as exc:
            for queued in batch:
                queued.fail(exc)
            raise
        try:
            try:
                # connect() is where a Sentinel-managed connection asks for the master; sending on an
                # unconnected one would open the default address instead.
                if not connection.is_connected:
                    connection.connect()
                self._send_and_read(connection, batch)
            except RedisConnectionError:
                # The server restarted or a proxy dropped the connection: once more, on a new connection, for
                # the commands not answered yet. The scripts recognise their own resend (see _ACCEPT_LUA).
                connection.disconnect()
                connection.connect()
                self._send_and_read(connection, [queued for queued in batch if not queued.answered])
        except BaseException as exc:
            # Timed out or broken mid-reply: the socket may still carry part of an answer, so it is closed; the
            # connection object is kept and connects afresh when next used. (Dropping it would leak one of the
            # pool's max_connections objects per failure: the pool counts every connection it ever made.)
            connection.disconnect()
            if isinstance(exc, Exception):
                for queued in batch:
                    if not queued.answered:
                        queued.fail(exc)
            raise
        finally:
            with self._lock:
                if self._closed:
                    connection.disconnect()

    @staticmethod
    def _send_and_read(connection: ConnectionInterface, batch: list[_Queued]) -> None:
        # One write for the whole batch (redis-py writes each item of a list separately).
        connection.send_packed_command([b"".join(queued.packed for queued in batch)], check_health=False)
        for queued in batch:
            try:
                queued.reply = connection.read_response()
            except ResponseError as exc:
                queued.error = exc  # this command's error reply; the connection carries on with the next
            queued.answered = True

    def close(self) -> None:
        """Disconnect; a batch in flight disconnects its connection when it is done, and no more are sent."""
        with self._lock:
            self._closed = True
            if not self._sending and self._connection is not None:
                self._connection.disconnect()


@dataclass(frozen=True, slots=True)
class _LuaScript:
    """A script run by its SHA-1 (``EVALSHA``), sent in full (``EVAL``) when the server does not know it yet.

    Loading on demand, per node, also covers a cluster node or a failed-over master that has never seen it.
    """

    source: str
    #: The digest Redis caches the script under (computed once: hashing the source cost 4 us per claim).
    sha1: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest())

    def run(self, client: RedisClient, keys: Sequence[str], args: Sequence[str | int],
            direct: DirectConnections | None = None) -> list[bytes | int]:
        """Run with ``keys`` and ``args`` (on ``direct`` connections when given); returns the array reply."""
        reply: object = None
        if direct is not None:
            try:
                reply = direct.run(pack_command("EVALSHA", self.sha1, len(keys), *keys, *args))
            except NoScriptError:
                reply = direct.run(pack_command("EVAL", self.source, len(keys), *keys, *args))
        else:
            try:
                reply = client.execute_command("EVALSHA", self.sha1, len(keys), *keys, *args)
            except NoScriptError:
                reply = client.execute_command("EVAL", self.source, len(keys), *keys, *args)
        if not isinstance(reply, list):
            raise StoreUnavailable(f"unexpected reply from a nonce store script: {reply!r}")
        return reply


_ACCEPT_SCRIPT: Final = _LuaScript(_ACCEPT_LUA)
_RATE_SCRIPT: Final = _LuaScript(_RATE_LUA)


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
        tag = _tag(nonce)
        seen = f"{KEY_PREFIX}:{{{tag}}}:seen"
        scope_digest = "" if scope is None else scope_tag(scope)
        scoped = f"{seen}:{scope_digest}" if scope_digest else seen
        keys = [f"{KEY_PREFIX}:{{{tag}}}:ch", seen, scoped]
        # One token per call of accept(), the same in redis-py's resend of the script (see _ACCEPT_LUA).
        token = secrets.token_urlsafe(CLAIM_TOKEN_BYTES)
        args = [client_id, "1" if require_challenge else "0", str(ttl_ms), token, scope_digest, MAX_LISTED_SCOPES]
        if self._min_replicas:
            reply, replicas = self._call(lambda client: self._run_replicated(client, keys, args))
        else:
            reply, replicas = self._call(lambda client: _ACCEPT_SCRIPT.run(client, keys, args, self._direct)), 0
        outcome = [_text(item) for item in reply]
        match outcome:
            case ["challenge" | "seen"] | ["accepted", _] if replicas < self._min_replicas:
                # The record is on the primary only: a failover now would forget it and let the document in
                # again. Fail closed; the record stays, so a retry of this document is refused as a replay.
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
        pipe.execute_command("EVAL", _ACCEPT_SCRIPT.source, len(keys), *keys, *args)
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
        reply = self._call(lambda client: _RATE_SCRIPT.run(client, keys, args, self._direct))
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
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        if client is not None:
            client.close()


# --- URLs --------------------------------------------------------------------------------------------


def _no_retry_on_timeout() -> Retry:
    # One immediate retry on a broken connection (the server restarted since the pooled connection was made),
    # none on timeouts: a hung server must cost one timeout, not several.
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiHostURL:
    """``scheme://[[user]:password@]host[:port][,host[:port]...][/path]``, the sentinel and cluster URL forms.

    redis-py parses single-host URLs only; these forms list several nodes so that any one of them can be down.
    """

    scheme: str
    username: str | None
    password: str | None
    hosts: tuple[tuple[str, int], ...]
    path: str

    @classmethod
    def parse(cls, url: str, *, default_port: int) -> MultiHostURL:
        """Split ``url``; raises :class:`ValueError` when a host, a port or the scheme separator is wrong."""
        scheme, separator, rest = url.partition("://")
        if not separator:
            raise ValueError("expected scheme://host:port")
        rest, _, query = rest.partition("?")
        if query:
            raise ValueError(f"query parameters are not supported in {scheme}:// URLs")
        authority, _, path = rest.partition("/")
        username = password = None
        if "@" in authority:
            userinfo, _, authority = authority.rpartition("@")
            user_text, has_password, password_text = userinfo.partition(":")
            username = unquote(user_text) or None
            password = unquote(password_text) if has_password else None
        if not authority:
            raise ValueError("no host given")
        hosts = tuple(_host_port(entry.strip(), default_port) for entry in authority.split(","))
        return cls(scheme=scheme.lower(), username=username, password=password, hosts=hosts, path=path)


def _host_port(entry: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif ":" in entry:
        host, _, port_text = entry.rpartition(":")
    else:
        host, port_text = entry, ""
    if not host:
        raise ValueError(f"missing host in {entry!r}")
    if port_text and not port_text.isdigit():
        raise ValueError(f"port of {entry!r} is not a number")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"port of {entry!r} is out of range")
    return host, port


def redis_store(
    url: str,
    *,
    timeout_seconds: float,
    challenge_ttl_seconds: float = DEFAULT_CHALLENGE_TTL_SECONDS,
    min_replicas: int | None = None,
) -> RedisNonceStore:
    """A :class:`RedisNonceStore` for one of the URL forms of ``ATTEST_NONCE_STORE``.

    * ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://...`` (TLS): redis-py's ``from_url``, with
      its query options;
    * ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``: the master of
      ``service_name`` as the sentinels report it (the password is the master's; the sentinels are not
      authenticated);
    * ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: a Redis Cluster found from these nodes.

    Socket connect and read timeouts are ``timeout_seconds``. With ``min_replicas`` > 0, an acceptance counts
    only once that many replicas confirmed the record (``WAIT``, within half the timeout); ``None`` takes
    :data:`DEFAULT_MIN_REPLICAS` of the scheme (1 with Sentinel and Cluster). ``WAIT`` confirms that the
    record reached that many replicas' memory; it is not consensus (docs/DEPLOYMENT.md, "Failover").
    Raises :class:`ValueError` for a malformed URL; nothing is contacted until the first call.
    """
    scheme = url.partition("://")[0].lower()
    connect: Callable[[], RedisClient]
    if scheme in ("redis", "rediss"):
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=_no_retry_on_timeout(),
        )
        connect = lambda: client  # noqa: E731 - from_url does not connect, so one client serves for good
    elif scheme == "redis+sentinel":
        connect = _sentinel_connector(url, timeout_seconds)
    elif scheme == "redis+cluster":
        connect = _cluster_connector(url, timeout_seconds)
    else:
        raise ValueError(f"unsupported scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if min_replicas is None:
        min_replicas = DEFAULT_MIN_REPLICAS[scheme]
    elif min_replicas < 0:
        raise ValueError(f"min_replicas must not be negative, got {min_replicas}")
    elif min_replicas == 0 and DEFAULT_MIN_REPLICAS[scheme]:
        _LOG.warning("nonce store %s: no replica required (ATTEST_STORE_MIN_REPLICAS=0); a failover can forget "
                     "an acceptance and let its document be accepted again", redact(url))
    # WAIT must return well before the socket read timeout gives up on it: half the timeout leaves the other
    # half for the script and the round trip on a busy machine (at 80 % a loaded host timed out the read).
    wait_timeout_ms = max(1, int(timeout_seconds * 1000 * 0.5))
    return RedisNonceStore(connect, description=redact(url), challenge_ttl_seconds=challenge_ttl_seconds,
                           min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)


def _sentinel_connector(url: str, timeout_seconds: float) -> Callable[[], RedisClient]:
    parsed = MultiHostURL.parse(url, default_port=DEFAULT_SENTINEL_PORT)
    service_name, _, db_text = parsed.path.strip("/").partition("/")
    if not service_name:
        raise ValueError("no service name given: redis+sentinel://host:port/service_name[/db]")
    if not db_text.isdigit() and db_text:
        raise ValueError(f"database {db_text!r} is not a number")
    db = int(db_text or "0")
    sentinel = Sentinel(
        list(parsed.hosts),
        sentinel_kwargs={
            "socket_timeout": timeout_seconds,
            "socket_connect_timeout": timeout_seconds,
            "retry": _no_retry_on_timeout(),
        },
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=_no_retry_on_timeout(),
    )
    # master_for does not connect either: each new connection asks the sentinels where the master is, so a
    # failover is followed without restarting the service.
    client: redis.Redis = sentinel.master_for(
        service_name, db=db, username=parsed.username, password=parsed.password
    )
    return lambda: client


def _cluster_connector(url: str, timeout_seconds: float) -> Callable[[], RedisClient]:
    parsed = MultiHostURL.parse(url, default_port=DEFAULT_REDIS_PORT)
    if parsed.path.strip("/"):
        raise ValueError("a cluster has no databases: redis+cluster://host:port[,host:port...]")
    nodes = [ClusterNode(host, port) for host, port in parsed.hosts]

    def connect() -> RedisClient:
        # The cluster client reads the slot map when it is made, so it is made on first use; no retries at the
        # cluster level either, so that a hung node costs one timeout.
        return RedisCluster(
            startup_nodes=nodes,
            username=parsed.username,
            password=parsed.password,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
        )

    return connect
