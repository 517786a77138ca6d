"""Optional AIA fallback: fetch an unpinned issuing CA from the signer's caIssuers URL, under strict rules.

Off by default (the setting ``ATTEST_AIA_FETCH=1`` turns it on). Pinning stays the way to trust a CA; the
fallback only bridges the days between Azure starting to sign with a new issuing CA and the operator
pinning it, and every use of it is logged and counted (``attest_aia_fetch_total{result}``) so that the
operator does pin it.

It is used only after the verification core refused a document with ``untrusted_chain``, which means the
checks that need no network already passed: the signature verifies under the signer the SignerInfo names
and that signer's name is the cloud's metadata domain (steps 4 and 5 of the verifier). Then:

1. The signer's Authority Information Access caIssuers URL (RFC 5280 4.2.2.1) must match the cloud's
   allow-list exactly: scheme, host, port and path prefix (defaults: Microsoft's PKI repositories
   ``www.microsoft.com/pkiops/certs/`` and ``/pki/mscorp/``, and DigiCert's ``cacerts.digicert.com/``).
2. The host must resolve only to public addresses (no private, loopback, link-local, multicast or
   reserved address, so the service cannot be turned against its own network); the connection goes to
   the address that was checked, not to a second resolution.
3. One GET, no redirects, a short timeout and a size cap.
4. The answer must be one certificate whose subject is the signer's issuer, which issued the signer's
   certificate (signature), is a CA, and itself chains to a pinned root of the cloud at the instant
   (the path validation of ``certs add``).
5. Results are cached: a good CA until its expiry or the positive TTL; a failure for the negative TTL, so
   a stream of such documents costs one fetch per URL and TTL.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID
from prometheus_client import Counter

from attest_service.errors import AttestError, ConfigurationError, UntrustedChain
from attest_service.trust import CloudTrust, PinnedCertificate, common_name, load_certificates
from attest_service.trust.certificates import ca_issuers_urls, ca_path, is_ca, is_self_signed

LOG: Final = logging.getLogger(__name__)

#: Largest certificate accepted from an AIA URL, in bytes; Azure's issuing CAs are under 2 KiB in DER.
MAX_FETCH_BYTES: Final = 16 * 1024
#: Connect and read timeout of one fetch, in seconds; the request waiting on it is a verification.
FETCH_TIMEOUT_SECONDS: Final = 2.0
#: How long a fetched and validated CA is reused, in seconds (at most until it expires).
POSITIVE_TTL_SECONDS: Final = 3600.0
#: How long a URL that failed is not fetched again, in seconds.
NEGATIVE_TTL_SECONDS: Final = 300.0
#: URLs remembered per cache; the allow-list keeps the real set to a handful.
MAX_CACHE_ENTRIES: Final = 256

FETCHES: Final = Counter("attest_aia_fetch",
                         "AIA fallback attempts by result (fetched, cached, negative_cached, not_allowed, no_url, "
                         "address_refused, redirect, http_error, too_large, invalid, untrusted, network_error).",
                         ["result"])

_V = TypeVar("_V")

AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; the default address check of :class:`AiaFetcher`."""
    return address.is_global and not address.is_multicast and not address.is_reserved


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowRule:
    """One allowed caIssuers location: exact scheme, host and port, and a path prefix."""

    scheme: str
    host: str
    path_prefix: str
    port: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ConfigurationError(f"AIA allow-list: scheme {self.scheme!r} is not http or https")
        if not self.host or not self.path_prefix.startswith("/"):
            raise ConfigurationError("AIA allow-list: a rule needs a host and a path prefix starting with /")

    def matches(self, url: str) -> bool:
        """True when ``url`` is under this rule (no user info, query or fragment allowed)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        default_port = 443 if parts.scheme == "https" else 80
        return (parts.scheme == self.scheme and parts.hostname == self.host.lower()
                and parts.username is None and parts.password is None and not parts.query and not parts.fragment
                and (port or default_port) == (self.port or default_port)
                and parts.path.startswith(self.path_prefix) and _plain_path(parts.path))


def _plain_path(path: str) -> bool:
    # Checked after percent-decoding, so that "%2e%2e" or "%2f" cannot smuggle a step out of the prefix.
    # Real caIssuers URLs need escapes (Microsoft's contain "%20"), so escapes themselves are allowed.
    decoded = unquote(path)
    return "\\" not in decoded and decoded.count("/") == path.count("/") and not any(
        segment in (".", "..") for segment in decoded.split("/"))


def _web_rules(*hosts_and_prefixes: tuple[str, str]) -> tuple[AllowRule, ...]:
    return tuple(AllowRule(scheme=scheme, host=host, path_prefix=prefix)
                 for host, prefix in hosts_and_prefixes for scheme in ("http", "https"))


@dataclass(frozen=True, slots=True, kw_only=True)
class AiaPolicy:
    """Where each cloud's issuing CAs may be fetched from; a cloud without rules never fetches."""

    allow: Mapping[str, tuple[AllowRule, ...]]
    #: Organisations a fetched CA's subject must name, per cloud. Chaining to a cloud's roots is not enough:
    #: DigiCert Global Root G2 also anchors DigiCert's own public issuing CAs, which are not Azure's.
    organizations: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({
        "public": ("Microsoft Corporation",), "usgov": ("Microsoft Corporation",),
        "china": ("Microsoft Corporation", "DigiCert Inc")}))

    @classmethod
    def azure(cls) -> AiaPolicy:
        """Microsoft's and DigiCert's CA repositories, which Azure's leaves name in caIssuers."""
        microsoft_and_digicert = _web_rules(("www.microsoft.com", "/pkiops/certs/"),
                                            ("www.microsoft.com", "/pki/mscorp/"), ("cacerts.digicert.com", "/"))
        return cls(allow=MappingProxyType({"public": microsoft_and_digicert, "usgov": microsoft_and_digicert,
                                           "china": _web_rules(("cacerts.digicert.cn", "/"),
                                                               ("cacerts.digicert.com", "/"))}))

    def allowed(self, cloud: str, url: str) -> bool:
        """True when ``url`` matches a rule of ``cloud``."""
        return any(rule.matches(url) for rule in self.allow.get(cloud, ()))


class _Refused(Exception):
    """One fetch failed; ``result`` is the metric label."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message


class _PinnedAddressHTTPConnection(http.client.HTTPConnection):
    """HTTP to an already checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedAddressHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an already checked address, verifying the certificate for the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=self.host)


def _remember(cache: dict[str, _V], url: str, value: _V) -> None:
    # Bounded by clearing: the allow-list keeps the real number of URLs far below the bound.
    if len(cache) >= MAX_CACHE_ENTRIES:
        cache.clear()
    cache[url] = value


@dataclass(slots=True)
class _Cache:
    good: dict[str, tuple[PinnedCertificate, float]] = field(default_factory=dict)
    bad: dict[str, tuple[str, str, float]] = field(default_factory=dict)


class AiaFetcher:
    """Fetches and validates unpinned issuing CAs (see the module docstring for every rule).

    ``allow_address`` decides which resolved addresses may be contacted; it defaults to public addresses
    only and exists as an argument so that tests can reach a server on loopback. It is deliberately not
    read from any setting.
    """

    def __init__(self, policy: AiaPolicy | None = None, *, allow_address: AddressCheck = is_public_address,
                 timeout_seconds: float = FETCH_TIMEOUT_SECONDS, max_bytes: int = MAX_FETCH_BYTES,
                 positive_ttl_seconds: float = POSITIVE_TTL_SECONDS,
                 negative_ttl_seconds: float = NEGATIVE_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy if policy is not None else AiaPolicy.azure()
        self._allow_address = allow_address
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._positive_ttl = positive_ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._clock = clock
        self._cache = _Cache()
        # One fetch at a time: fetches are rare, and concurrent requests for the same URL then wait for
        # the first one's answer (cached) instead of fetching it again.
        self._lock = threading.Lock()

    def issuer_for(self, signer: x509.Certificate, trust: CloudTrust, *, now: datetime) -> PinnedCertificate:
        """The signer's issuing CA, fetched and validated for ``trust``'s cloud at ``now``.

        Raises UntrustedChain (with the reason) when no allowed URL yields a valid CA.
        """
        cloud = trust.profile.name
        urls = ca_issuers_urls(signer)
        if not urls:
            self._count("no_url", "the signer names no caIssuers URL")
            raise UntrustedChain("the signer's issuer is not pinned and the signer names no caIssuers URL")
        allowed = [url for url in urls if self.policy.allowed(cloud, url)]
        if not allowed:
            self._count("not_allowed", f"caIssuers {', '.join(urls)} not in the {cloud} allow-list")
            raise UntrustedChain(f"the signer's issuer is not pinned and its caIssuers URL ({urls[0][:200]}) "
                                 f"is not allowed for {cloud}")
        url = allowed[0]
        with self._lock:
            return self._issuer_from(url, signer, trust, now)

    def _issuer_from(self, url: str, signer: x509.Certificate, trust: CloudTrust, now: datetime) -> PinnedCertificate:
        moment = self._clock()
        good = self._cache.good.get(url)
        if good is not None and good[1] > moment and good[0].certificate.subject == signer.issuer:
            try:
                self._validate(good[0].certificate, signer, trust, now)
            except _Refused:
                pass  # e.g. the instant moved out of its validity; fetch again below
            else:
                FETCHES.labels(result="cached").inc()
                return good[0]
        bad = self._cache.bad.get(url)
        if bad is not None and bad[2] > moment:
            self._count("negative_cached", f"{url}: failed recently ({bad[1]})")
            raise UntrustedChain(f"the signer's issuer is not pinned and fetching it from {url} failed recently: "
                                 f"{bad[1]}")
        try:
            certificate = self._parse(self._fetch(url))
            self._validate(certificate, signer, trust, now)
        except _Refused as exc:
            _remember(self._cache.bad, url, (exc.result, exc.message, moment + self._negative_ttl))
            self._count(exc.result, f"{url}: {exc.message}")
            raise UntrustedChain(f"the signer's issuer is not pinned and fetching it from {url} failed: "
                                 f"{exc.message}") from exc
        pin = PinnedCertificate(cloud=trust.profile.name, role="intermediate", certificate=certificate,
                                source=f"aia:{url}")
        lifetime = (certificate.not_valid_after_utc - now).total_seconds()
        _remember(self._cache.good, url, (pin, moment + min(self._positive_ttl, lifetime)))
        self._cache.bad.pop(url, None)
        FETCHES.labels(result="fetched").inc()
        LOG.warning("AIA: fetched unpinned issuing CA %s (sha256 %s) from %s for %s; pin it with certs add",
                    pin.subject_cn, pin.sha256, url, trust.profile.name)
        return pin

    @staticmethod
    def _count(result: str, message: str) -> None:
        FETCHES.labels(result=result).inc()
        LOG.warning("AIA: %s: %s", result, message)

    def _resolve(self, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise _Refused("network_error", f"cannot resolve {host}: {exc}") from exc
        addresses = []
        for info in infos:
            try:
                addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
            except ValueError as exc:
                raise _Refused("address_refused", f"{host} resolved to an unusable address") from exc
        if not addresses:
            raise _Refused("network_error", f"{host} has no address")
        # Every address must pass, not just the first: a name answering with a mix is not trusted.
        refused = [str(a) for a in addresses if not self._allow_address(a)]
        if refused:
            raise _Refused("address_refused", f"{host} resolves to non-public address {refused[0]}")
        return str(addresses[0])

    def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._resolve(host, port)
        connection_type = (_PinnedAddressHTTPSConnection if parts.scheme == "https"
                           else _PinnedAddressHTTPConnection)
        connection = connection_type(host, port, address, self._timeout)
        try:
            connection.request("GET", parts.path or "/", headers={"Accept": "application/pkix-cert"})
            response = connection.getresponse()
            if 300 <= response.status < 400:
                raise _Refused("redirect", f"answered {response.status} (redirects are not followed)")
            if response.status != 200:
                raise _Refused("http_error", f"answered {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                raise _Refused("too_large", f"{declared} bytes is over {self._max_bytes}")
            body = response.read(self._max_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _Refused("network_error", str(exc) or type(exc).__name__) from exc
        finally:
            connection.close()
        if len(body) > self._max_bytes:
            raise _Refused("too_large", f"over {self._max_bytes} bytes")
        return body

    @staticmethod
    def _parse(body: bytes) -> x509.Certificate:
        try:
            certificates = load_certificates(body, origin="AIA response")
        except ConfigurationError as exc:
            raise _Refused("invalid", exc.message) from exc
        if len(certificates) != 1:
            raise _Refused("invalid", f"{len(certificates)} certificates instead of one")
        return certificates[0]

    def _validate(self, ca: x509.Certificate, signer: x509.Certificate, trust: CloudTrust, now: datetime) -> None:
        name = common_name(ca.subject)
        organizations = {str(attr.value) for attr in ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}
        if not organizations & set(self.policy.organizations.get(trust.profile.name, ())):
            raise _Refused("invalid", f"{name} is not operated by an organisation this cloud's documents use")
        if ca.subject != signer.issuer:
            raise _Refused("invalid", f"{name} is not the signer's issuer {common_name(signer.issuer)}")
        if not is_ca(ca) or is_self_signed(ca):
            raise _Refused("invalid", f"{name} is not an intermediate CA")
        try:
            signer.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise _Refused("invalid", f"{name} did not issue the signer's certificate") from exc
        try:
            ca_path(ca, trust, now)
        except AttestError as exc:
            raise _Refused("untrusted", exc.message) from exc
