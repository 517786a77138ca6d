"""A SQLite transaction that fails on the way (its COMMIT cannot be written) leaves nothing behind.

The failure is real: a child process lowers its own file-size limit (``RLIMIT_FSIZE``) to the size the
write-ahead log has reached, so the next COMMIT, which appends to the log, gets ``EFBIG`` from the kernel
("disk I/O error"), as a full disk would. The child raises the limit again and carries on with the same store.

For this failure SQLite rolls the transaction back by itself (a disk filled to the last byte, ``SQLITE_FULL``,
behaves the same), so the write lock is free and the next ``BEGIN IMMEDIATE`` works even without the store's
help. The store does not rely on that: SQLite documents failed COMMITs that leave the transaction open
(``SQLITE_BUSY``), so it rolls back whatever is left and never reuses a connection a transaction failed on.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attest_service.errors import AttestError
from attest_service.nonces import SQLiteNonceStore

# The store is driven from a child process that is killed mid-commit.
pytestmark = pytest.mark.slow

#: Seconds the child may take (start, a few transactions).
CHILD_TIMEOUT_SECONDS = 60


def _accept(store: SQLiteNonceStore, nonce: str) -> str:
    now = datetime.now(UTC)
    try:
        store.accept(nonce, client_id="c", expires_at=now + timedelta(hours=1), require_challenge=False, now=now)
    except AttestError as exc:
        return exc.code
    return "accepted"


def _write_lock_free(path: Path) -> bool:
    """Whether another connection gets the write lock at once (no transaction was left holding it)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()
    return True


def _child(path: str, results: multiprocessing.Queue[dict[str, object]]) -> None:
    try:
        _commit_fails_then_recovers(path, results)
    except BaseException as exc:
        results.put({"child failed": repr(exc)})
        raise


def _commit_fails_then_recovers(path: str, results: multiprocessing.Queue[dict[str, object]]) -> None:
    store = SQLiteNonceStore(Path(path), timeout_seconds=0.5)
    report: dict[str, object] = {"warm-up": [_accept(store, f"warm-{index}") for index in range(3)]}
    failed_connection = store._connection  # the connection the failure happens on
    wal = Path(f"{path}-wal")
    # Writing past the limit raises SIGXFSZ, which would kill the process; ignored, write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size, hard))
    try:
        report["while the log cannot grow"] = _accept(store, "during")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report["write lock free"] = _write_lock_free(Path(path))
    report["connection kept"] = store._connection is failed_connection
    # The same store, same process: the refused nonce was not recorded, and the store works.
    report["the refused nonce, again"] = _accept(store, "during")
    report["a fresh nonce"] = _accept(store, "fresh")
    report["the refused nonce, a third time"] = _accept(store, "during")
    results.put(report)


def test_failed_commit_is_rolled_back_and_its_connection_dropped(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[dict[str, object]] = context.Queue()
    child = context.Process(target=_child, args=(str(tmp_path / "n.sqlite3"), results))
    child.start()
    try:
        report = results.get(timeout=CHILD_TIMEOUT_SECONDS)
    finally:
        child.join(timeout=CHILD_TIMEOUT_SECONDS)
    assert child.exitcode == 0
    assert report == {
        "warm-up": ["accepted"] * 3,
        "while the log cannot grow": "store_unavailable",
        "write lock free": True,
        # A connection on which a transaction failed is not trusted again: the next call opens a new one.
        "connection kept": False,
        "the refused nonce, again": "accepted",
        "a fresh nonce": "accepted",
        "the refused nonce, a third time": "nonce_replayed",
    }, report
