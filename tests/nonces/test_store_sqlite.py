"""SQLite specifics: expired rows are purged on the callers' clock; the file is in WAL mode."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from attest_service.nonces import SQLiteNonceStore
from attest_service.nonces.sqlite_store import PURGE_INTERVAL_MS
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
