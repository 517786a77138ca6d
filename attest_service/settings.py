"""Settings: read once from the environment at start-up, validated, immutable.

A bad value stops the process with a message naming the variable; nothing is re-read per request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

from attest_service.errors import ConfigurationError
from attest_service.logformat import log_format
from attest_service.nonces import default_sqlite_url
from attest_service.results import DEFAULT_ISSUER, check_issuer
from attest_service.results.claims import ANONYMOUS_AUDIENCE
from attest_service.trust import pinned_dir_from_env
from attest_service.verify import DEFAULT_REVOCATION, RevocationMode, revocation_mode

#: Upper bounds that keep a typo (an extra zero) from turning into an unsafe setting.
MAX_CHALLENGE_TTL: Final = timedelta(hours=1)
MAX_STORE_TIMEOUT_SECONDS: Final = 30.0
MAX_RELOAD_SECONDS: Final = 30  # the contract promises pickup of pin changes within 30 seconds

#: Default budget of failed authentications (401 answers) per source and minute; past it the source is
#: answered 429 before its key is even looked at, so keys cannot be guessed online at speed.
DEFAULT_AUTH_FAILURES_PER_MINUTE: Final = 30
#: Default number of challenges one anonymous source may be issued per challenge lifetime: each is a record
#: the store keeps until it expires, and anonymous callers are not accountable for them.
DEFAULT_ANONYMOUS_CHALLENGES: Final = 300
#: Default seconds within which a request body must arrive in full: a verification body is a few KiB that a
#: client sends at once, and a connection waiting for a body holds a worker connection and its buffer.
DEFAULT_BODY_TIMEOUT_SECONDS: Final = 10.0
#: Bounds of ATTEST_BODY_TIMEOUT_SECONDS: a body of 1 MiB over a slow link needs a few seconds, and beyond a
#: couple of minutes the setting no longer protects anything.
MIN_BODY_TIMEOUT_SECONDS: Final = 0.5
MAX_BODY_TIMEOUT_SECONDS: Final = 120.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Client ids no key may have: ``anonymous`` is the ``aud`` of the results of callers without a key, so a
#: client of that name would have its relying parties accept results its own allow-lists refused.
RESERVED_CLIENT_IDS: Final = frozenset({ANONYMOUS_AUDIENCE})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
#: The folder of the embedded default result key, beside the SQLite store's file.
GENERATED_KEYS_FOLDER: Final = "result-keys"
#: Bounds of ATTEST_RESULT_TTL_SECONDS: a result outliving a day is a typo (relying parties re-attest).
MIN_RESULT_TTL_SECONDS: Final = 10
MAX_RESULT_TTL_SECONDS: Final = 86400


def _result_keys(env: Mapping[str, str], store: str) -> tuple[Path | None, bool]:
    """``ATTEST_RESULT_KEYS``: the key directory (None: results off) and whether it is the generated default."""
    raw = (env.get("ATTEST_RESULT_KEYS") or "").strip()
    if raw.lower() == "off":
        return None, False
    if raw:
        return Path(raw), False
    if not store.startswith("sqlite:///"):
        # Every replica on a shared store must publish the same keys: a key generated per pod would not be.
        return None, False
    database = store.removeprefix("sqlite:///")
    return Path(database).parent / GENERATED_KEYS_FOLDER, True


def parse_api_keys(value: str) -> Mapping[str, tuple[bytes, ...]]:
    """Parse ``client_id:sha256hex,...`` into client id -> the SHA-256 digests of its keys.

    A client may be listed with several keys (``vendor-a:h1,vendor-a:h2``), each valid, so that a key can be
    rotated without downtime: add the new one, move the client to it, remove the old one. The same digest
    twice, or under two clients, is refused: it would be a typo, and a key must name exactly one client.
    """
    keys: dict[str, list[bytes]] = {}
    owners: dict[bytes, str] = {}
    for item in value.split(","):
        entry = item.strip()
        if not entry:
            continue
        client_id, sep, digest = entry.partition(":")
        client_id = client_id.strip()
        digest = digest.strip().lower()
        if not sep or not _CLIENT_ID.fullmatch(client_id):
            raise ConfigurationError(f"ATTEST_API_KEYS: {client_id[:40]!r} is not a client id (letters, digits, ._-)")
        if client_id.lower() in RESERVED_CLIENT_IDS:
            raise ConfigurationError(f"ATTEST_API_KEYS: {_reserved(client_id)}")
        if not _SHA256_HEX.fullmatch(digest):
            raise ConfigurationError(f"ATTEST_API_KEYS: the key of {client_id!r} is not a hex SHA-256 digest "
                                     "(attest-service api-key new CLIENT_ID prints an entry)")
        raw = bytes.fromhex(digest)
        if raw in owners:
            where = "twice" if owners[raw] == client_id else f"for both {owners[raw]!r} and {client_id!r}"
            raise ConfigurationError(f"ATTEST_API_KEYS: the key {digest[:12]}... is listed {where}")
        owners[raw] = client_id
        keys.setdefault(client_id, []).append(raw)
    return MappingProxyType({client_id: tuple(digests) for client_id, digests in keys.items()})


def _reserved(client_id: str) -> str:
    return (f"the client id {client_id!r} is reserved: the attestation results of callers without a key name "
            f"{ANONYMOUS_AUDIENCE!r} as their audience")


def api_key_entry(client_id: str, key: str) -> str:
    """The ``ATTEST_API_KEYS`` entry of ``key`` for ``client_id``: ``client_id:sha256hex``.

    Raises ValueError when ``client_id`` is not one the variable accepts.
    """
    if not _CLIENT_ID.fullmatch(client_id):
        raise ValueError(f"{client_id[:40]!r} is not a client id: 1 to 64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if client_id.lower() in RESERVED_CLIENT_IDS:
        raise ValueError(_reserved(client_id))
    return f"{client_id}:{hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def parse_trusted_proxies(value: str) -> tuple[IPNetwork, ...]:
    """Parse ``ATTEST_TRUSTED_PROXIES``: comma-separated addresses or CIDR blocks (IPv4 or IPv6)."""
    networks: list[IPNetwork] = []
    for item in value.split(","):
        entry = item.strip()
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=True)
        except ValueError as exc:
            raise ConfigurationError(f"ATTEST_TRUSTED_PROXIES: {entry[:60]!r} is not an address or CIDR block "
                                     f"({exc})") from None
        if network.prefixlen == 0:
            # Every peer would be a proxy, and any caller could name itself any address.
            raise ConfigurationError(f"ATTEST_TRUSTED_PROXIES: {entry} would believe X-Forwarded-For from anyone")
        networks.append(network)
    return tuple(networks)


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}: {raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigurationError(f"{name}: {value:g} is outside {low:g}..{high:g}")
    return value


def _log_format(env: Mapping[str, str]) -> str:
    try:
        return log_format(env)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _flag(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    raw = (env.get(name) or ("1" if default else "0")).strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigurationError(f"{name}: expected 0 or 1, got {raw!r}")
    return raw in ("1", "true", "yes")


#: Shortest interval of the background CRL fetch: CRLs are published hours apart.
MIN_CRL_REFRESH_SECONDS: Final = 60.0


def _crl_refresh(env: Mapping[str, str]) -> float:
    seconds = _number(env, "ATTEST_CRL_REFRESH_SECONDS", 0, 0, 7 * 86400)
    if 0 < seconds < MIN_CRL_REFRESH_SECONDS:
        raise ConfigurationError(f"ATTEST_CRL_REFRESH_SECONDS: 0 (off) or at least {MIN_CRL_REFRESH_SECONDS:g}")
    return seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the service is configured with; see README "Configuration" for each variable."""

    pinned_certs: Path
    nonce_store_url: str
    #: Each client's accepted key digests (several while a key is being rotated).
    api_keys: Mapping[str, tuple[bytes, ...]]
    policy_file: Path | None
    challenge_ttl: timedelta
    clock_skew: timedelta
    store_timeout_seconds: float
    rate_limit_per_minute: int
    trust_reload_seconds: float
    log_level: str
    #: ``json`` (the default) or ``text``: the one shape of every log line (attest_service.logformat).
    log_format: str = "json"
    aia_fetch: bool = False
    #: Fetch the CAs pinned by fingerprint in the background (ATTEST_FINGERPRINT_FETCH, on unless 0).
    fingerprint_fetch: bool = True
    #: ``None`` when ATTEST_STORE_MIN_REPLICAS is unset: the store's default for its URL (1 with Sentinel or
    #: Cluster, 0 with a single Redis server).
    store_min_replicas: int | None = None
    #: Admit keyless callers with their own nonces although the service listens beyond loopback.
    allow_open: bool = False
    #: Peers whose X-Forwarded-For header names the client (a load balancer, an ingress).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: 401 answers one source may get per minute before it is answered 429.
    auth_failures_per_minute: int = DEFAULT_AUTH_FAILURES_PER_MINUTE
    #: Challenges one anonymous source may be issued per challenge lifetime.
    anonymous_challenges: int = DEFAULT_ANONYMOUS_CHALLENGES
    #: What a verification does about revocation: ``soft``, ``hard`` or ``off`` (ATTEST_REVOCATION).
    revocation: RevocationMode = DEFAULT_REVOCATION
    #: Seconds within which a request body must arrive in full, else 408 (and the connection is closed).
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS
    #: Seconds between two fetches of the trust directory's CRLs beside the service; 0: none
    #: (ATTEST_CRL_REFRESH_SECONDS).
    crl_refresh_seconds: float = 0.0
    #: The directory of result-signing keys (ATTEST_RESULT_KEYS); None: attestation results are off.
    result_keys: Path | None = None
    #: Whether ``result_keys`` is the embedded default, whose one key is generated on first start.
    result_keys_generated: bool = False
    #: The ``iss`` of results and the discovery document's ``issuer`` (ATTEST_RESULT_ISSUER).
    result_issuer: str = DEFAULT_ISSUER
    #: The lifetime of a result (ATTEST_RESULT_TTL_SECONDS).
    result_ttl: timedelta = timedelta(seconds=600)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the ``ATTEST_*`` variables; raise ConfigurationError naming the bad one."""
        env = os.environ if env is None else env
        pinned = pinned_dir_from_env(env)
        store = env.get("ATTEST_NONCE_STORE") or default_sqlite_url()
        if not store.startswith(("redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://",
                                 "redis+cluster://", "rediss+cluster://", "sqlite:///")):
            raise ConfigurationError("ATTEST_NONCE_STORE: expected redis://, rediss://, redis+sentinel://, "
                                     "rediss+sentinel://, redis+cluster://, rediss+cluster:// or sqlite:/// URL")
        policy = env.get("ATTEST_POLICY_FILE")
        level = (env.get("ATTEST_LOG_LEVEL") or "info").lower()
        if level not in _LOG_LEVELS:
            raise ConfigurationError(f"ATTEST_LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}")
        api_keys = parse_api_keys(env.get("ATTEST_API_KEYS", ""))
        allow_open = _flag(env, "ATTEST_ALLOW_OPEN")
        if allow_open and (api_keys or policy):
            # With keys or a policy file, who may call is already decided; an open switch beside them would
            # either do nothing or silently undo them.
            raise ConfigurationError("ATTEST_ALLOW_OPEN=1 applies only without ATTEST_API_KEYS and "
                                     "ATTEST_POLICY_FILE")
        result_keys, generated = _result_keys(env, store)
        return cls(
            pinned_certs=pinned,
            nonce_store_url=store,
            api_keys=api_keys,
            policy_file=Path(policy) if policy else None,
            challenge_ttl=timedelta(seconds=_number(env, "ATTEST_CHALLENGE_TTL_SECONDS", 300, 10,
                                                    MAX_CHALLENGE_TTL.total_seconds())),
            clock_skew=timedelta(seconds=_number(env, "ATTEST_CLOCK_SKEW_SECONDS", 60, 0, 3600)),
            store_timeout_seconds=_number(env, "ATTEST_STORE_TIMEOUT_SECONDS", 0.5, 0.05, MAX_STORE_TIMEOUT_SECONDS),
            rate_limit_per_minute=int(_number(env, "ATTEST_RATE_LIMIT_PER_MINUTE", 600, 1, 1_000_000)),
            trust_reload_seconds=_number(env, "ATTEST_TRUST_RELOAD_SECONDS", 10, 1, MAX_RELOAD_SECONDS),
            log_level=level,
            log_format=_log_format(env),
            aia_fetch=_flag(env, "ATTEST_AIA_FETCH"),
            fingerprint_fetch=_flag(env, "ATTEST_FINGERPRINT_FETCH", default=True),
            store_min_replicas=(int(_number(env, "ATTEST_STORE_MIN_REPLICAS", 0, 0, 16))
                                if (env.get("ATTEST_STORE_MIN_REPLICAS") or "").strip() else None),
            allow_open=allow_open,
            trusted_proxies=parse_trusted_proxies(env.get("ATTEST_TRUSTED_PROXIES", "")),
            auth_failures_per_minute=int(_number(env, "ATTEST_AUTH_FAILURES_PER_MINUTE",
                                                 DEFAULT_AUTH_FAILURES_PER_MINUTE, 1, 10_000)),
            anonymous_challenges=int(_number(env, "ATTEST_ANONYMOUS_CHALLENGES", DEFAULT_ANONYMOUS_CHALLENGES,
                                             1, 1_000_000)),
            revocation=revocation_mode((env.get("ATTEST_REVOCATION") or DEFAULT_REVOCATION).strip().lower(),
                                       origin="ATTEST_REVOCATION"),
            body_timeout_seconds=_number(env, "ATTEST_BODY_TIMEOUT_SECONDS", DEFAULT_BODY_TIMEOUT_SECONDS,
                                         MIN_BODY_TIMEOUT_SECONDS, MAX_BODY_TIMEOUT_SECONDS),
            crl_refresh_seconds=_crl_refresh(env),
            result_keys=result_keys,
            result_keys_generated=generated,
            result_issuer=check_issuer((env.get("ATTEST_RESULT_ISSUER") or "").strip() or DEFAULT_ISSUER),
            result_ttl=timedelta(seconds=_number(env, "ATTEST_RESULT_TTL_SECONDS", 600, MIN_RESULT_TTL_SECONDS,
                                                 MAX_RESULT_TTL_SECONDS)),
        )
