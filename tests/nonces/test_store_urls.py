"""ATTEST_NONCE_STORE URL forms, the default SQLite location, and the sliding-window arithmetic."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attest_service.errors import ConfigurationError
from attest_service.nonces import RedisNonceStore, SQLiteNonceStore, default_sqlite_url, open_store
from attest_service.nonces.redis.urls import MultiHostURL
from attest_service.nonces.sqlite_store import sqlite_path
from attest_service.nonces.store import RateWindow, redact


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "rediss://:secret@cache.example:6380/1",
        "redis+sentinel://s1:26379,s2:26379,[::1]:26380/mymaster/2",
        "redis+sentinel://:secret@s1/mymaster",
        "redis+cluster://n1:7000,n2:7001,n3",
    ],
)
def test_redis_urls_open_without_connecting(url: str) -> None:
    store = open_store(url, timeout_seconds=0.5)
    assert isinstance(store, RedisNonceStore)
    assert "secret" not in repr(store)
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        "memcached://localhost",
        "redis+sentinel://s1:26379",  # no service name
        "redis+sentinel://s1:26379/mymaster/zero",
        "redis+sentinel://s1:notaport/mymaster",
        "redis+cluster://n1:7000/3",  # clusters have no databases
        "redis+cluster://n1:70000",
        "redis+cluster://:secret@",
        "sqlite://relative-without-third-slash",
        "sqlite:///",
        "sqlite:///:memory:",
        "",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_store(url, timeout_seconds=0.5)
    assert "secret" not in error.value.message


def test_bad_timeouts_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        open_store("redis://localhost", timeout_seconds=0)
    with pytest.raises(ConfigurationError):
        open_store("redis://localhost", timeout_seconds=0.5, challenge_ttl_seconds=-1)


def test_multi_host_url_parts() -> None:
    parsed = MultiHostURL.parse("redis+sentinel://user:p%40ss@s1:26379,[::1],s3:1/mymaster/2", default_port=26379)
    assert parsed.scheme == "redis+sentinel"
    assert parsed.username == "user"
    assert parsed.password == "p@ss"
    assert parsed.hosts == (("s1", 26379), ("::1", 26379), ("s3", 1))
    assert parsed.path == "mymaster/2"
    bare = MultiHostURL.parse("redis+cluster://n1", default_port=6379)
    assert (bare.username, bare.password, bare.hosts, bare.path) == (None, None, (("n1", 6379),), "")


def test_redact() -> None:
    assert redact("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis+sentinel://u:secret@a:1,b:2/m") == "redis+sentinel://u:***@a:1,b:2/m"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    # redis-py also reads a password from the query: no query is ever shown.
    assert redact("redis://h:1/0?password=secret") == "redis://h:1/0?***"
    assert "secret" not in redact("rediss://u:secret@h:1/0?ssl_cert_reqs=none&password=secret")


def test_sqlite_paths(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:///relative/nonces.db") == Path("relative/nonces.db")
    assert sqlite_path(f"sqlite:///{tmp_path}/n.db") == tmp_path / "n.db"
    assert sqlite_path("sqlite:////var/lib/attest/n.db") == Path("/var/lib/attest/n.db")
    assert isinstance(open_store(f"sqlite:///{tmp_path}/n.db", timeout_seconds=0.5), SQLiteNonceStore)


def test_default_sqlite_url_follows_xdg_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    url = default_sqlite_url()
    assert url == f"sqlite:///{tmp_path}/state/attest-service/nonces.sqlite3"
    assert url.startswith("sqlite:////")
    assert not (tmp_path / "state").exists(), "the directory is created lazily, by the store"
    assert sqlite_path(url) == tmp_path / "state" / "attest-service" / "nonces.sqlite3"


def test_default_sqlite_url_without_xdg_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_sqlite_url() == f"sqlite:///{tmp_path}/.local/state/attest-service/nonces.sqlite3"


# --- sliding window ----------------------------------------------------------------------------------------

WINDOW_START = datetime(2030, 1, 1, tzinfo=UTC)  # a multiple of 60 s since the epoch


def test_window_position() -> None:
    window = RateWindow.at(WINDOW_START + timedelta(seconds=15), 60)
    assert window.elapsed_ms == 15_000
    assert window.window_ms == 60_000
    assert window.expires_ms == (window.index + 2) * 60_000


@pytest.mark.parametrize(
    ("elapsed_s", "previous", "current", "limit", "allowed"),
    [
        (0, 0, 9, 10, True),  # the tenth request fits
        (0, 0, 10, 10, False),
        (0, 10, 0, 10, False),  # the whole previous window still counts at its end
        (30, 10, 4, 10, True),  # half of it does: 5 + 4 + 1 = 10
        (30, 10, 5, 10, False),
        (59, 100, 0, 2, False),  # a sixtieth of a burst of 100 still weighs 1.67: 1.67 + 1 > 2
        (59, 100, 0, 3, True),
    ],
)
def test_window_allows(elapsed_s: int, previous: int, current: int, limit: int, allowed: bool) -> None:
    window = RateWindow.at(WINDOW_START + timedelta(seconds=elapsed_s), 60)
    assert window.allows(previous=previous, current=current, limit=limit) is allowed


def test_retry_after_is_when_one_more_request_fits() -> None:
    window = RateWindow.at(WINDOW_START + timedelta(seconds=30), 60)
    # 10 in the previous window, 5 in this one, limit 10: one more fits once 10 * (1 - e/60) + 6 <= 10,
    # i.e. at e = 36 s, six seconds from now.
    refusal = window.refusal(previous=10, current=5, limit=10)
    assert refusal.retry_after == 6
    later = RateWindow.at(WINDOW_START + timedelta(seconds=36), 60)
    assert later.allows(previous=10, current=5, limit=10)
    # This window is full: wait for the next one, and for its weight to decay to leave room.
    full = window.refusal(previous=0, current=10, limit=10)
    assert full.retry_after == 30 + 6  # 10 * (1 - e/60) + 1 <= 10 at e = 6 s into the next window
    assert window.refusal(previous=0, current=1, limit=1).retry_after == 90


def test_rate_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RateWindow.at(WINDOW_START, 0)


@pytest.mark.parametrize("url", ["redis+sentinel://:secret@s1/mymaster", "redis+cluster://:secret@n1:7000"])
def test_no_replica_required_of_a_failover_topology_is_logged(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="attest_service.nonces"):
        open_store(url, timeout_seconds=0.5).close()
        assert not caplog.records  # the default requires one
        open_store(url, timeout_seconds=0.5, min_replicas=0).close()
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "failover can forget an acceptance" in message
    assert "secret" not in message
