"""Single-use nonces: service-issued challenges, accepted nonces and per-client rate counters.

:func:`open_store` turns an ``ATTEST_NONCE_STORE`` URL into a :class:`NonceStore`:

* ``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://`` (and over TLS ``rediss+sentinel://``,
  ``rediss+cluster://``) -- Redis, shared by every replica
  (:mod:`attest_service.nonces.redis`);
* ``sqlite:///relative/path``, ``sqlite:////absolute/path`` -- a SQLite file shared by the worker processes
  of one machine (:mod:`attest_service.nonces.sqlite_store`); :func:`default_sqlite_url` names the default.

The rules every backend keeps are in :mod:`attest_service.nonces.store`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from attest_service.errors import ConfigurationError
from attest_service.nonces.store import (
    CACHED_DOCUMENT_HINT,
    DEFAULT_CHALLENGE_TTL_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    REDIS_SCHEMES,
    Acceptance,
    NonceStore,
    redact,
)

if TYPE_CHECKING:
    from attest_service.nonces.redis.store import RedisNonceStore
    from attest_service.nonces.sqlite_store import SQLiteNonceStore

__all__ = [
    "CACHED_DOCUMENT_HINT",
    "DEFAULT_CHALLENGE_TTL_SECONDS",
    "DEFAULT_TIMEOUT_SECONDS",
    "Acceptance",
    "NonceStore",
    "RedisNonceStore",
    "SQLiteNonceStore",
    "default_sqlite_url",
    "open_store",
]


def default_sqlite_url() -> str:
    """``sqlite:///<$XDG_STATE_HOME or ~/.local/state>/attest-service/nonces.sqlite3``.

    The directory is created when the store first opens the file, not here.
    """
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    path = Path(state_home).expanduser().absolute() / "attest-service" / "nonces.sqlite3"
    # An absolute path after "sqlite:///" yields the four-slash form.
    return f"sqlite:///{path}"


def open_store(
    url: str,
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    challenge_ttl_seconds: float = DEFAULT_CHALLENGE_TTL_SECONDS,
    min_replicas: int | None = None,
) -> NonceStore:
    """The nonce store an ``ATTEST_NONCE_STORE`` URL names.

    ``timeout_seconds`` bounds each round trip (Redis connect and read timeouts; SQLite's wait for the write
    lock). ``challenge_ttl_seconds`` is the minimum lifetime of a seen record. ``min_replicas`` (Redis only)
    is how many replicas must confirm an acceptance before it counts; ``None``: 1 for Sentinel and Cluster
    URLs, 0 for a single server. Nothing is contacted here;
    the first call (or :meth:`NonceStore.ping`) connects. Raises
    :class:`~attest_service.errors.ConfigurationError` for an unsupported or malformed URL.
    """
    if not timeout_seconds > 0:
        raise ConfigurationError(f"nonce store timeout must be positive, got {timeout_seconds} s")
    if not challenge_ttl_seconds > 0:
        raise ConfigurationError(f"challenge lifetime must be positive, got {challenge_ttl_seconds} s")
    scheme = url.partition("://")[0].lower()
    # Each backend is imported when its URL is opened: a process on the embedded store never loads redis,
    # and the library can name the store protocol without either backend.
    try:
        if scheme in REDIS_SCHEMES:
            from attest_service.nonces.redis.urls import redis_store  # noqa: PLC0415

            return redis_store(url, timeout_seconds=timeout_seconds, challenge_ttl_seconds=challenge_ttl_seconds,
                               min_replicas=min_replicas)
        if scheme == "sqlite":
            from attest_service.nonces.sqlite_store import SQLiteNonceStore, sqlite_path  # noqa: PLC0415

            return SQLiteNonceStore(
                sqlite_path(url), timeout_seconds=timeout_seconds, challenge_ttl_seconds=challenge_ttl_seconds
            )
    except ValueError as exc:
        raise ConfigurationError(f"nonce store URL {redact(url)!r} is invalid: {exc}") from exc
    # The message names the URL, not a variable: a library caller passed it as an argument; the service,
    # which reads it from ATTEST_NONCE_STORE, says so itself.
    raise ConfigurationError(
        f"nonce store URL {redact(url)!r} is invalid: expected sqlite:///path or one of "
        + ", ".join(f"{s}://" for s in REDIS_SCHEMES)
    )


def __getattr__(name: str) -> object:
    # The backend classes are exported by name, loaded on first use (see open_store).
    if name == "RedisNonceStore":
        from attest_service.nonces.redis.store import RedisNonceStore  # noqa: PLC0415

        return RedisNonceStore
    if name == "SQLiteNonceStore":
        from attest_service.nonces.sqlite_store import SQLiteNonceStore  # noqa: PLC0415

        return SQLiteNonceStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
