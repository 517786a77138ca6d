"""Nonce store in a SQLite file, shared by the worker processes of one machine.

Safety across processes comes from SQLite itself: write-ahead logging so readers never block, a busy timeout
so a writer waits for the lock instead of failing at once, and ``BEGIN IMMEDIATE`` so every decision takes the
write lock before it reads (two processes can never both read "not seen" and both insert). The nonce is the
primary key of the ``seen`` table (and with the VM, of ``seen_vm``), so even a logic error could not insert a
record twice.

Each process opens its own connection: a connection inherited through ``fork()`` (gunicorn's pre-fork model)
must not be used by the child, so the owning pid is checked on every call. Threads of one process share
the connection under a lock. Expired rows are purged from time to time, on the caller's clock.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Final, TypeVar

from attest_service.errors import AttestError, NonceReplayed, NonceUnknown, StoreUnavailable
from attest_service.nonces.store import (
    DEFAULT_CHALLENGE_TTL_SECONDS,
    Acceptance,
    RateWindow,
    check_nonce,
    check_scope,
    epoch_ms,
    replayed,
    scope_tag,
    seen_until_ms,
)

#: Purge expired rows at most this often per process (milliseconds of the callers' clock), unless the last
#: purge left some behind.
PURGE_INTERVAL_MS: Final = 60_000
#: SQLite's ``synchronous`` level. In WAL mode, NORMAL syncs the log only at checkpoints, not at each commit.
#: SQLite's documentation (https://www.sqlite.org/pragma.html#pragma_synchronous): "WAL mode is always
#: consistent with synchronous=NORMAL, but WAL mode does lose durability. A transaction committed in WAL mode
#: with synchronous=NORMAL might roll back following a power loss or system crash. Transactions are durable
#: across application crashes regardless of the synchronous setting or journal mode." So a crash of the service
#: (SIGKILL, out of memory) forgets no acceptance (tests/nonces/test_store_sqlite_crash.py); an operating-system
#: crash or a power cut may forget the last acceptances. FULL would keep those too, at one fsync per commit
#: while holding the write lock: on a shared disk that sometimes exceeded the store timeout, and the other
#: workers' requests failed with 503 (benchmarks/bench_embedded_store.py; figures in docs/DEPLOYMENT.md).
SYNCHRONOUS: Final = "NORMAL"
#: Rows of each table one purge deletes at most: an operation never pays for a whole backlog at once. While
#: a purge leaves expired rows behind, the next operation purges again, so a flood (each operation adds one
#: row at most) is cleaned up as it goes.
PURGE_BATCH_ROWS: Final = 1000
#: Each table, with the columns of its primary key (bounded deletes select rows by it).
_PURGED_TABLES: Final = (("challenges", "nonce"), ("seen", "nonce"), ("seen_vm", "nonce, vm"),
                         ("rate", "client_id, window_index"))
#: ``seen.challenge`` of a caller-chosen nonce claimed without a scope (and of every row written before scopes).
SEEN_UNSCOPED: Final = 0
#: ``seen.challenge`` of a consumed challenge.
SEEN_CHALLENGE: Final = 1
#: ``seen.challenge`` of a caller-chosen nonce claimed per VM: ``seen_vm`` lists the VMs (by scope tag). The
#: ``seen`` row outlives all of them, so that a release before scopes, reading only ``seen``, refuses the nonce.
SEEN_PER_VM: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS challenges (
    nonce      TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS challenges_expiry ON challenges (expires_ms);
CREATE TABLE IF NOT EXISTS seen (
    nonce      TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL,
    challenge  INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_ms);
CREATE TABLE IF NOT EXISTS seen_vm (
    nonce      TEXT NOT NULL,
    vm         TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (nonce, vm)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_vm_expiry ON seen_vm (expires_ms);
CREATE TABLE IF NOT EXISTS rate (
    client_id    TEXT NOT NULL,
    window_index INTEGER NOT NULL,
    hits         INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    PRIMARY KEY (client_id, window_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_expiry ON rate (expires_ms);
"""

_T = TypeVar("_T")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` URL.

    Raises :class:`ValueError` for other forms (``open_store`` reports it as a configuration error).
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError("expected sqlite:///relative/path or sqlite:////absolute/path")
    rest = url[len(prefix) :]
    if "?" in rest or "#" in rest:
        raise ValueError("query strings and fragments are not supported in sqlite URLs")
    if rest == ":memory:":
        # Each process would get its own empty database: replays across workers would pass unnoticed.
        raise ValueError("an in-memory database cannot be shared between workers; give a file path")
    return Path(rest)


class SQLiteNonceStore:
    """:class:`~attest_service.nonces.store.NonceStore` in one SQLite file (one machine, many processes)."""

    def __init__(
        self, path: Path, *, timeout_seconds: float, challenge_ttl_seconds: float = DEFAULT_CHALLENGE_TTL_SECONDS
    ) -> None:
        self.path = path
        self._timeout_seconds = timeout_seconds
        self._challenge_ttl_seconds = challenge_ttl_seconds
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._last_purge_ms = 0
        self._purge_backlog = False
        self._closed = False
        # A thread of the parent may hold the lock at the moment of fork(); the child starts with a fresh one.
        # The hook holds the store weakly, so registering it does not keep stores alive.
        os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def __repr__(self) -> str:
        return f"SQLiteNonceStore({str(self.path)!r})"

    # --- connection --------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        """This process's connection, opened (and the schema created) on first use after start or fork."""
        if self._closed:
            raise StoreUnavailable("the nonce store was closed")
        pid = os.getpid()
        if self._connection is not None and self._pid == pid:
            return self._connection
        # A connection inherited from the parent is abandoned, not closed: closing it could disturb the
        # parent's locks on the file. The child opens its own.
        self._connection = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path,
            timeout=self._timeout_seconds,
            isolation_level=None,  # transactions are begun explicitly, with BEGIN IMMEDIATE
            check_same_thread=False,  # shared by this process's threads, under self._lock
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {max(1, round(self._timeout_seconds * 1000))}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            connection.executescript(_SCHEMA)
        except BaseException:
            connection.close()
            raise
        self._connection, self._pid = connection, pid
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; sqlite3 errors become :class:`StoreUnavailable`.

        A decision the body raises (replayed, unknown) rolls back, releasing the write lock. Any other failure
        once the transaction began, the COMMIT's included, rolls back if SQLite has not already done so and
        drops the connection: SQLite leaves some failed COMMITs (``SQLITE_BUSY``) with the transaction still
        open, and a connection stuck in a transaction would fail every later ``BEGIN IMMEDIATE`` of this
        process while holding the write lock of every other. The next call opens a fresh connection.
        """
        with self._lock:
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, OSError) as exc:  # OSError: the directory could not be created
                # No transaction began (the lock was busy, the file unusable): the connection is as it was.
                raise StoreUnavailable(f"nonce store {self.path} failed: {exc}") from exc
            try:
                try:
                    yield connection
                except AttestError:
                    connection.execute("ROLLBACK")
                    raise
                connection.execute("COMMIT")
            except AttestError:
                raise
            except sqlite3.Error as exc:
                self._discard_connection()
                raise StoreUnavailable(f"nonce store {self.path} failed: {exc}") from exc
            except BaseException:
                self._discard_connection()
                raise

    def _discard_connection(self) -> None:
        """Roll back whatever is left open and close this process's connection (under ``self._lock``)."""
        connection, self._connection = self._connection, None
        if connection is None or self._pid != os.getpid():
            return
        with contextlib.suppress(sqlite3.Error):
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            connection.close()

    def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._transaction() as connection:
            return operation(connection)

    # --- NonceStore ----------------------------------------------------------------------------------

    def issue_challenge(self, nonce: str, *, client_id: str, expires_at: datetime, now: datetime | None = None) -> None:
        """Insert the challenge; an existing row with the same nonce (even expired, until purged) refuses it.

        With ``now``, expired rows are purged from time to time, as after an acceptance: a flood of challenges
        that are never used must not stay on a service that accepts nothing.
        """
        check_nonce(nonce, client_id)
        expires_ms = epoch_ms(expires_at)

        def insert(connection: sqlite3.Connection) -> None:
            try:
                connection.execute(
                    "INSERT INTO challenges (nonce, client_id, expires_ms) VALUES (?, ?, ?)",
                    (nonce, client_id, expires_ms),
                )
            except sqlite3.IntegrityError as exc:
                raise NonceReplayed(f"nonce {nonce!r} was already issued as a challenge") from exc

        self._run(insert)
        if now is not None:
            self._maybe_purge(now)

    def accept(
        self, nonce: str, *, client_id: str, expires_at: datetime, require_challenge: bool, now: datetime,
        scope: str | None = None,
    ) -> Acceptance:
        """Decide and record in one ``BEGIN IMMEDIATE`` transaction (see the protocol for the rules)."""
        check_nonce(nonce, client_id)
        check_scope(scope)
        tag = None if scope is None else scope_tag(scope)
        now_ms = epoch_ms(now)
        until_ms = seen_until_ms(expires_at=expires_at, now=now, challenge_ttl_seconds=self._challenge_ttl_seconds)

        def decide(connection: sqlite3.Connection) -> Acceptance:
            seen = connection.execute(
                "SELECT client_id, challenge FROM seen WHERE nonce = ? AND expires_ms > ?", (nonce, now_ms)
            ).fetchone()
            if seen is not None and (seen[1] != SEEN_PER_VM or tag is None):
                # A challenge, a claim without a scope, or a row from before scopes: refuses every claim.
                raise replayed(nonce, client_id=client_id, seen_client_id=seen[0],
                               seen_challenge=seen[1] == SEEN_CHALLENGE)
            if seen is not None and connection.execute(
                "SELECT 1 FROM seen_vm WHERE nonce = ? AND vm = ? AND expires_ms > ?", (nonce, tag, now_ms)
            ).fetchone() is not None:
                raise replayed(nonce, client_id=client_id, seen_client_id=seen[0], seen_challenge=False)
            challenge = connection.execute(
                "SELECT client_id, expires_ms FROM challenges WHERE nonce = ? AND expires_ms > ?", (nonce, now_ms)
            ).fetchone()
            if challenge is not None and challenge[0] != client_id:
                raise NonceUnknown(f"nonce {nonce!r} was not issued to client {client_id!r}")
            if challenge is None and require_challenge:
                raise NonceUnknown(f"nonce {nonce!r} is not a live challenge: never issued, expired or consumed")
            record_until_ms, kind = until_ms, SEEN_UNSCOPED
            if challenge is not None:
                connection.execute("DELETE FROM challenges WHERE nonce = ?", (nonce,))
                record_until_ms, kind = max(until_ms, challenge[1]), SEEN_CHALLENGE
            elif tag is not None:
                kind = SEEN_PER_VM
                connection.execute(
                    "INSERT INTO seen_vm (nonce, vm, expires_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (nonce, vm) DO UPDATE SET expires_ms = excluded.expires_ms",
                    (nonce, tag, record_until_ms),
                )
            # The nonce's row: new, replacing an expired one awaiting the purge, or standing for one more VM (or
            # turned into a consumed challenge); it keeps the longer of the two lifetimes.
            connection.execute(
                "INSERT INTO seen (nonce, client_id, challenge, expires_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (nonce) DO UPDATE SET client_id = excluded.client_id, challenge = excluded.challenge, "
                "expires_ms = max(expires_ms, excluded.expires_ms)",
                (nonce, client_id, kind, record_until_ms),
            )
            return Acceptance(challenge=challenge is not None)

        acceptance = self._run(decide)
        self._maybe_purge(now)
        return acceptance

    def hit_rate(self, client_id: str, *, limit: int, window_seconds: int, now: datetime, count: int = 1) -> int:
        """Count up to ``count`` requests in this window's row, as many as the sliding-window estimate admits."""
        if limit <= 0:
            raise ValueError(f"rate limit must be positive, got {limit}")
        if count <= 0:
            raise ValueError(f"rate count must be positive, got {count}")
        window = RateWindow.at(now, window_seconds)

        def charge(connection: sqlite3.Connection) -> tuple[int, int, int]:
            rows = dict(
                connection.execute(
                    "SELECT window_index, hits FROM rate WHERE client_id = ? AND window_index IN (?, ?)",
                    (client_id, window.index - 1, window.index),
                ).fetchall()
            )
            previous, current = rows.get(window.index - 1, 0), rows.get(window.index, 0)
            granted = min(count, window.room(previous=previous, current=current, limit=limit))
            if granted <= 0:
                return 0, previous, current
            connection.execute(
                "INSERT INTO rate (client_id, window_index, hits, expires_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (client_id, window_index) DO UPDATE SET hits = hits + excluded.hits",
                (client_id, window.index, granted, window.expires_ms),
            )
            return granted, previous, current

        granted, previous, current = self._run(charge)
        self._maybe_purge(now)
        if not granted:
            raise window.refusal(previous=previous, current=current, limit=limit)
        return granted

    def ping(self) -> None:
        """Open the database if needed and run a trivial read."""
        with self._lock:
            try:
                self._connect().execute("SELECT 1 FROM seen LIMIT 1").fetchall()
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"nonce store {self.path} failed: {exc}") from exc

    def close(self) -> None:
        """Close this process's connection."""
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            if connection is not None and self._pid == os.getpid():
                connection.close()

    def purge(self, now: datetime) -> int:
        """Delete every record expired at ``now``; returns how many rows went."""
        deleted, _ = self._purge(now, limit=None)
        return deleted

    def _purge(self, now: datetime, *, limit: int | None) -> tuple[int, bool]:
        """Delete records expired at ``now``, at most ``limit`` rows per table; (rows deleted, whether any left)."""
        now_ms = epoch_ms(now)

        def delete(connection: sqlite3.Connection) -> tuple[int, bool]:
            deleted, backlog = 0, False
            for table, key in _PURGED_TABLES:
                if limit is None:
                    rows = connection.execute(f"DELETE FROM {table} WHERE expires_ms <= ?", (now_ms,)).rowcount  # noqa: S608 - fixed names
                else:
                    # The expiry index finds the oldest rows; the primary key deletes exactly those.
                    rows = connection.execute(
                        f"DELETE FROM {table} WHERE ({key}) IN "  # noqa: S608 - fixed names
                        f"(SELECT {key} FROM {table} WHERE expires_ms <= ? LIMIT ?)", (now_ms, limit)).rowcount
                    backlog = backlog or rows >= limit
                deleted += rows
            return deleted, backlog

        self._last_purge_ms = now_ms
        return self._run(delete)

    def _maybe_purge(self, now: datetime) -> None:
        # Purging is housekeeping: it runs after the decision committed, and its failure (a busy database)
        # must not turn an acceptance that already happened into an error.
        if not self._purge_backlog and epoch_ms(now) - self._last_purge_ms < PURGE_INTERVAL_MS:
            return
        try:
            _, self._purge_backlog = self._purge(now, limit=PURGE_BATCH_ROWS)
        except StoreUnavailable:
            self._last_purge_ms = epoch_ms(now)
            self._purge_backlog = False


def _reset_after_fork(store_ref: weakref.ref[SQLiteNonceStore]) -> None:
    store = store_ref()
    if store is not None:
        store._after_fork()
