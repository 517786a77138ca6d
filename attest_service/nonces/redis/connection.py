"""The group-commit connection: one redis-py connection used directly for the store's per-request scripts."""

from __future__ import annotations

import copy
import threading
from collections import deque
from typing import Final, TypeAlias

import redis
from redis.cluster import RedisCluster
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

RedisClient: TypeAlias = "redis.Redis | RedisCluster"


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

    Why not ``execute_command``: around the one socket exchange it checks a connection out of the pool with
    a readiness poll, wraps the call in its retry and observability layers, packs the command argument by
    argument and looks up response callbacks: together about as much CPU as the exchange itself
    (docs/DEPLOYMENT.md, "Figures behind the code"), and more under gevent, where each of those layers also
    yields. The connection is still redis-py's (made by the client's pool, so Sentinel's follows the
    master), and replies are read by its parser.

    Commands that arrive while a batch is out wait for it and then go together, in one write, as the next
    batch (group commit); the replies come back in order. Under load a worker's concurrent claims then cost
    Redis one read and one write between them instead of one each, and Redis spends less CPU per claim the
    more of them come together (same figures). Each script is atomic on its own, so sending several at once
    changes no outcome.

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
                # the commands not answered yet. The scripts recognise their own resend (see accept.lua).
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

