"""From an ``ATTEST_NONCE_STORE`` URL to a :class:`~attest_service.nonces.redis.store.RedisNonceStore`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qs, unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import Sentinel

from attest_service.nonces.redis.connection import RedisClient
from attest_service.nonces.redis.store import RedisNonceStore
from attest_service.nonces.store import DEFAULT_CHALLENGE_TTL_SECONDS, REDIS_SCHEMES, redact

DEFAULT_REDIS_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379
#: URL schemes :func:`redis_store` understands.
SCHEMES: Final = REDIS_SCHEMES
#: Replicas that must confirm an acceptance when none is configured, by URL scheme. Sentinel and Cluster fail
#: over to a replica, which has only what reached it: a record on the primary alone would be forgotten and its
#: document accepted again. A single server (redis://, rediss://) has no failover to survive; if it does have
#: replicas that an operator promotes by hand, configure the number explicitly.
DEFAULT_MIN_REPLICAS: Final = MappingProxyType({"redis": 0, "rediss": 0, "redis+sentinel": 1, "rediss+sentinel": 1,
                                                "redis+cluster": 1, "rediss+cluster": 1})
#: TLS options of ``rediss+sentinel://`` and ``rediss+cluster://`` URLs, as query parameters: redis-py's names,
#: which ``rediss://`` URLs take too (CA bundle, client certificate and key, verification, host name check).
TLS_OPTIONS: Final = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS: Final = ("none", "optional", "required")
_BOOLEANS: Final = MappingProxyType({"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False})

_LOG: Final = logging.getLogger(__name__)


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
    #: The query string (without "?"): the TLS options of the rediss+ forms.
    query: str = ""

    @classmethod
    def parse(cls, url: str, *, default_port: int) -> MultiHostURL:
        """Split ``url``; raises :class:`ValueError` when a host, a port or the scheme separator is wrong."""
        scheme, separator, rest = url.partition("://")
        if not separator:
            raise ValueError("expected scheme://host:port")
        rest, _, query = rest.partition("?")
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
        return cls(scheme=scheme.lower(), username=username, password=password, hosts=hosts, path=path, query=query)

    def tls_options(self) -> dict[str, object]:
        """redis-py's connection options for TLS (``ssl=True`` and :data:`TLS_OPTIONS` given), or ``{}``.

        Only the ``rediss+`` schemes use TLS and take query parameters; raises :class:`ValueError` for a query
        on another scheme, an unknown or repeated parameter, or a value of the wrong kind.
        """
        if not self.scheme.startswith("rediss+"):
            if self.query:
                raise ValueError(f"query parameters are not supported in {self.scheme}:// URLs (TLS options need "
                                 f"rediss+{self.scheme.partition('+')[2]}://)")
            return {}
        options: dict[str, object] = {"ssl": True}
        for name, values in parse_qs(self.query, keep_blank_values=True, strict_parsing=bool(self.query)).items():
            if name not in TLS_OPTIONS:
                raise ValueError(f"unknown option {name!r} in a {self.scheme}:// URL; expected one of "
                                 f"{', '.join(TLS_OPTIONS)}")
            if len(values) != 1 or not values[0]:
                raise ValueError(f"option {name!r} must be given once, with a value")
            value = values[0]
            if name == "ssl_cert_reqs":
                if value not in _CERT_REQS:
                    raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {value!r}")
                options[name] = value
            elif name == "ssl_check_hostname":
                if value.lower() not in _BOOLEANS:
                    raise ValueError(f"ssl_check_hostname must be true or false, got {value!r}")
                options[name] = _BOOLEANS[value.lower()]
            else:
                options[name] = value
        return options


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
    * ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: a Redis Cluster found from these nodes;
    * ``rediss+sentinel://...`` and ``rediss+cluster://...``: the same over TLS, to the sentinels and to every
      data node, with the options of :data:`TLS_OPTIONS` as query parameters (``?ssl_ca_certs=/path/ca.pem``).

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
    elif scheme in ("redis+sentinel", "rediss+sentinel"):
        connect = _sentinel_connector(url, timeout_seconds)
    elif scheme in ("redis+cluster", "rediss+cluster"):
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
    # half for the script and the round trip on a busy machine (a larger share let the read time out on a loaded host).
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
    # The same TLS options for the sentinels and for the master and replicas they name.
    tls = parsed.tls_options()
    sentinel = Sentinel(
        list(parsed.hosts),
        sentinel_kwargs={
            "socket_timeout": timeout_seconds,
            "socket_connect_timeout": timeout_seconds,
            "retry": _no_retry_on_timeout(),
            **tls,
        },
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=_no_retry_on_timeout(),
        **tls,
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
    tls = parsed.tls_options()

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
            **tls,  # type: ignore[arg-type]
        )

    return connect
