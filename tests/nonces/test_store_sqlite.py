"""SQLite specifics: expired rows are purged on the callers' clock; the file is in WAL mode."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attest_service.nonces import SQLiteNonceStore
from attest_service.nonces.sqlite_store import PURGE_BATCH_ROWS, PURGE_INTERVAL_MS
from attest_service.nonces.store import CLOCK_DISAGREEMENT_MARGIN_SECONDS

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as connection:
        rows: int = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return rows


#: Seen records outlive their document by this margin; documents "expired that long ago" leave short records.
MARGIN = timedelta(seconds=CLOCK_DISAGREEMENT_MARGIN_SECONDS)


def test_purge_removes_expired_records_only(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5, challenge_ttl_seconds=60)
    store.issue_challenge("old-challenge", client_id="c", expires_at=NOW + timedelta(seconds=30))
    store.issue_challenge("new-challenge", client_id="c", expires_at=NOW + timedelta(hours=1))
    store.accept("old-seen", client_id="c", expires_at=NOW - MARGIN, require_challenge=False, now=NOW)
    store.accept("new-seen", client_id="c", expires_at=NOW + timedelta(hours=1), require_challenge=False, now=NOW)
    store.hit_rate("c", limit=10, window_seconds=60, now=NOW)
    assert store.purge(NOW + timedelta(minutes=5)) == 3  # old challenge, old seen record, the rate window
    assert (count(path, "challenges"), count(path, "seen"), count(path, "rate")) == (1, 1, 0)
    store.close()


def test_accept_purges_from_time_to_time(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5, challenge_ttl_seconds=1)
    for index in range(5):
        store.accept(f"n{index}", client_id="c", expires_at=NOW - MARGIN, require_challenge=False, now=NOW)
    assert count(path, "seen") == 5
    later = NOW + timedelta(milliseconds=PURGE_INTERVAL_MS)
    store.accept("last", client_id="c", expires_at=later, require_challenge=False, now=later)
    assert count(path, "seen") == 1
    store.close()


def test_database_uses_write_ahead_logging(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5)
    store.ping()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_issuing_challenges_purges_expired_ones(tmp_path: Path) -> None:
    # A flood of challenges nobody uses, on a service that accepts nothing: issuing alone must clean up.
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5)
    for index in range(5):
        store.issue_challenge(f"flood-{index}", client_id="c", expires_at=NOW + timedelta(seconds=30), now=NOW)
    assert count(path, "challenges") == 5
    later = NOW + timedelta(milliseconds=PURGE_INTERVAL_MS)
    store.issue_challenge("later", client_id="c", expires_at=later + timedelta(seconds=30), now=later)
    assert count(path, "challenges") == 1
    store.close()


def test_counting_requests_purges_expired_rate_windows(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5)
    for index in range(5):
        store.hit_rate(f"client-{index}", limit=10, window_seconds=60, now=NOW)
    later = NOW + timedelta(minutes=3)  # both windows of those counts are over
    store.hit_rate("client-late", limit=10, window_seconds=60, now=later)
    assert count(path, "rate") == 1
    store.close()


def test_a_purge_is_bounded_and_catches_up_over_the_next_operations(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite3"
    store = SQLiteNonceStore(path, timeout_seconds=0.5)
    backlog = 2 * PURGE_BATCH_ROWS + 10
    store.ping()  # creates the schema
    with sqlite3.connect(path) as connection:
        connection.executemany("INSERT INTO challenges (nonce, client_id, expires_ms) VALUES (?, 'c', 0)",
                               [(f"old-{index}",) for index in range(backlog)])
    later = NOW + timedelta(milliseconds=PURGE_INTERVAL_MS)
    expires = later + timedelta(seconds=30)
    # Each operation deletes at most one batch; while expired rows remain, the next operation goes on.
    store.issue_challenge("a", client_id="c", expires_at=expires, now=later)
    assert count(path, "challenges") == backlog - PURGE_BATCH_ROWS + 1
    store.issue_challenge("b", client_id="c", expires_at=expires, now=later)
    assert count(path, "challenges") == backlog - 2 * PURGE_BATCH_ROWS + 2
    store.issue_challenge("c", client_id="c", expires_at=expires, now=later)
    assert count(path, "challenges") == 3
    store.close()


def test_commits_are_synced_at_checkpoints_not_one_by_one(tmp_path: Path) -> None:
    # synchronous=NORMAL in WAL mode: durable across a crash of the process (test_store_sqlite_crash.py),
    # without an fsync per commit while the write lock is held (docs/DEPLOYMENT.md, "The embedded store").
    store = SQLiteNonceStore(tmp_path / "n.sqlite3", timeout_seconds=0.5)
    store.ping()
    connection = store._connection  # the level is a property of each connection, not of the file
    assert connection is not None
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()
