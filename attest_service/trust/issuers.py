"""Where an unpinned issuing CA may be fetched from, how, and what it must be to be accepted.

The service's AIA fallback (:mod:`attest_service.trust.aia`, which adds caching, a fetch budget and metrics)
and ``certs add --from-document`` (:mod:`attest_service.trust.pins`) share these rules, so a CA the
operator pins from a document is held to exactly what the fallback would demand of it: fetching is
:class:`AiaPolicy` and :class:`CertificateFetcher` (rules 1 to 3), accepting :func:`accept_issuing_ca`
(rules 4 to 7), then :func:`check_issued` per document. Nothing here imports the service's runtime.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from attest_service.errors import AttestError, ConfigurationError
from attest_service.trust.certificates import ca_path, is_ca, is_self_signed
from attest_service.trust.loading import load_certificates
from attest_service.verify import CloudTrust, FingerprintPin, common_name, digests, fingerprint

#: Largest certificate accepted from an AIA URL, in bytes; Azure's issuing CAs are under 2 KiB in DER.
MAX_FETCH_BYTES: Final = 16 * 1024
#: Connect and read timeout of one fetch, in seconds; the request waiting on it is a verification.
FETCH_TIMEOUT_SECONDS: Final = 2.0

AddressCheck = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; the default address check of every fetch."""
    return address.is_global and not address.is_multicast and not address.is_reserved


class FetchRefused(Exception):
    """Obtaining or accepting an issuing CA failed; ``result`` is the metric label, ``message`` says why."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message


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
        """True when ``url`` is under this rule (no user info, query, fragment, space or control character)."""
        if not url.isprintable() or " " in url:
            # urlsplit drops tabs and newlines (WHATWG), so ".../ca.crt\n<anything>" would match otherwise.
            return False
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
    """Where each cloud's issuing CAs may be fetched from and what they must be; a cloud without rules never fetches.

    Rule 1: the caIssuers URL (RFC 5280 4.2.2.1) must match the cloud's allow-list exactly: scheme, host,
    port and path prefix (:meth:`azure`: Microsoft's PKI repositories and DigiCert's ``cacerts`` hosts).
    """

    allow: Mapping[str, tuple[AllowRule, ...]]
    #: Organisations the issuing CAs of each cloud's documents name. A fetched CA of a cloud outside
    #: ``fingerprint_only`` must name one (chaining to a cloud's roots is not enough: DigiCert Global Root
    #: G2 also anchors DigiCert's own public issuing CAs).
    organizations: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({
        "public": ("Microsoft Corporation",), "usgov": ("Microsoft Corporation",),
        "china": ("DigiCert Inc", "Microsoft Corporation")}))
    #: Clouds whose fetched CAs must be pinned by fingerprint (rule 6 of :func:`accept_issuing_ca`).
    fingerprint_only: frozenset[str] = frozenset({"china"})

    @classmethod
    def azure(cls) -> AiaPolicy:
        """Microsoft's and DigiCert's CA repositories, which Azure's leaves name in caIssuers."""
        # caissuers.microsoft.com is the second caIssuers host of the Microsoft TLS G2 leaves (2026).
        microsoft_and_digicert = _web_rules(("www.microsoft.com", "/pkiops/certs/"),
                                            ("caissuers.microsoft.com", "/pkiops/certs/"),
                                            ("www.microsoft.com", "/pki/mscorp/"), ("cacerts.digicert.com", "/"))
        return cls(allow=MappingProxyType({"public": microsoft_and_digicert, "usgov": microsoft_and_digicert,
                                           "china": _web_rules(("cacerts.digicert.cn", "/"),
                                                               ("cacerts.digicert.com", "/"))}))

    def allowed(self, cloud: str, url: str) -> bool:
        """True when ``url`` matches a rule of ``cloud``."""
        return any(rule.matches(url) for rule in self.allow.get(cloud, ()))

    def fetch_url(self, trust: CloudTrust, ca_issuers: Sequence[str]) -> str:
        """The caIssuers URL to fetch the signer's issuer from; FetchRefused when none may be fetched.

        The first URL on the cloud's allow-list; for a fingerprint-only cloud, the first that a fingerprint
        pin names (or any allowed one, when a pin names no URL).
        """
        cloud = trust.profile.name
        if not ca_issuers:
            raise FetchRefused("no_url", "the signer names no caIssuers URL")
        allowed = [url for url in ca_issuers if self.allowed(cloud, url)]
        if not allowed:
            raise FetchRefused("not_allowed", f"its caIssuers URL ({ca_issuers[0][:200]}) is not allowed for {cloud}")
        if cloud not in self.fingerprint_only:
            return allowed[0]
        pinned_urls = {pin.url for pin in trust.fingerprint_pins}
        candidates = [url for url in allowed if url in pinned_urls or None in pinned_urls]
        if not candidates:
            raise FetchRefused("unpinned", f"{cloud} takes only issuing CAs pinned by fingerprint, and no "
                                           f"fingerprint pin names {allowed[0][:200]}")
        return candidates[0]


def _organizations(name: x509.Name) -> set[str]:
    return {str(attr.value) for attr in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateFetcher:
    """One guarded GET of a certificate; no cache, no state.

    Rule 2: the host must resolve only to public addresses (no private, loopback, link-local, multicast or
    reserved address, so the service cannot be turned against its own network); the connection goes to
    the address that was checked, not to a second resolution. Rule 3: one GET, no redirects, a short
    timeout and a size cap; the answer must be exactly one certificate.

    ``allow_address`` decides which resolved addresses may be contacted; it defaults to public addresses
    only and exists as an argument so that tests can reach a server on loopback. It is deliberately not
    read from any setting.
    """

    allow_address: AddressCheck = is_public_address
    timeout_seconds: float = FETCH_TIMEOUT_SECONDS
    max_bytes: int = MAX_FETCH_BYTES

    def fetch(self, url: str) -> x509.Certificate:
        """The one certificate at ``url``; raises FetchRefused naming the failure."""
        return self._parse(self._get(url))

    def fetch_bytes(self, url: str, *, accept: str) -> bytes:
        """The body at ``url`` under the same rules (address, one GET, no redirect, size cap), unparsed."""
        return self._get(url, accept=accept)

    def _resolve(self, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise FetchRefused("network_error", f"cannot resolve {host}: {exc}") from exc
        addresses = []
        for info in infos:
            try:
                addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
            except ValueError as exc:
                raise FetchRefused("address_refused", f"{host} resolved to an unusable address") from exc
        if not addresses:
            raise FetchRefused("network_error", f"{host} has no address")
        # Every address must pass, not just the first: a name answering with a mix is not trusted.
        refused = [str(a) for a in addresses if not self.allow_address(a)]
        if refused:
            raise FetchRefused("address_refused", f"{host} resolves to non-public address {refused[0]}")
        return str(addresses[0])

    def _get(self, url: str, *, accept: str = "application/pkix-cert") -> bytes:
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchRefused("not_allowed", f"{url[:200]} has no usable port") from exc
        address = self._resolve(host, port)
        connection_type = (_PinnedAddressHTTPSConnection if parts.scheme == "https"
                           else _PinnedAddressHTTPConnection)
        connection = connection_type(host, port, address, self.timeout_seconds)
        try:
            connection.request("GET", parts.path or "/", headers={"Accept": accept})
            response = connection.getresponse()
            if 300 <= response.status < 400:
                raise FetchRefused("redirect", f"answered {response.status} (redirects are not followed)")
            if response.status != 200:
                raise FetchRefused("http_error", f"answered {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise FetchRefused("too_large", f"{declared} bytes is over {self.max_bytes}")
            body = response.read(self.max_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchRefused("network_error", str(exc) or type(exc).__name__) from exc
        finally:
            connection.close()
        if len(body) > self.max_bytes:
            raise FetchRefused("too_large", f"over {self.max_bytes} bytes")
        return body

    @staticmethod
    def _parse(body: bytes) -> x509.Certificate:
        try:
            certificates = load_certificates(body, origin="AIA response")
        except ConfigurationError as exc:
            raise FetchRefused("invalid", exc.message) from exc
        if len(certificates) != 1:
            raise FetchRefused("invalid", f"{len(certificates)} certificates instead of one")
        return certificates[0]


def accept_issuing_ca(ca: x509.Certificate, trust: CloudTrust, *, policy: AiaPolicy,
                      now: datetime) -> FingerprintPin | None:
    """Whether ``ca``, fetched for ``trust``'s cloud, is accepted at ``now``: rules 4 to 7.

    4. It is not one ``certs remove`` unpinned (``intermediates/removed.txt``): a removed pin stays distrusted.
    5. It is an intermediate CA (basicConstraints CA, not self-signed).
    6. It is the certificate a fingerprint pin names (``intermediates/fingerprints.txt``), or, for a cloud not
       in :attr:`AiaPolicy.fingerprint_only`, its subject names an organisation the cloud's issuing CAs use.
       Azure China is fingerprint-only. Its issuing CAs are DigiCert's ("DigiCert Basic RSA CN CA G2",
       "DigiCert Basic OV G2 TLS CN RSA4096 SHA256 2022 CA1") under DigiCert Global Root CA and G2, the same
       roots and the same organisation as every public DV/OV CA DigiCert runs; no organisation, host or path
       rule can tell those apart, so "DigiCert Inc" admitted all of them. A subject allow-list would not be
       enough either: a subject is a name, not a key, and a re-keyed or re-issued CA may carry the same one.
       A fingerprint names exactly the bytes Microsoft lists, and pins taken from Microsoft's list can be
       staged before the first document arrives.
    7. It chains to a pinned root of the cloud at the instant (the path validation of ``certs add``).

    Returns the fingerprint pin it matched (None when the organisation rule admitted it); raises
    FetchRefused (``removed``, ``invalid``, ``unpinned`` or ``untrusted``) otherwise. Looks at nothing but
    the CA and the pinned trust, so the outcome is the same for every document naming the same URL; whether
    the CA issued a document's signer is :func:`check_issued`'s question, asked per document, never cached.

    SHA-1 fingerprint pins: Microsoft publishes only a SHA-1 thumbprint for some CAs (DigiCert Basic OV G2
    TLS CN RSA4096 SHA256 2022 CA1). SHA-1 is used here only to recognise bytes fetched from an allow-listed
    URL; the certificate must still be a CA chaining, by signatures, to a pinned root. Passing off another
    certificate would need a SHA-1 second preimage of a certificate the attacker did not make (the known
    SHA-1 attacks are collisions between two documents the attacker makes both of), and a signature of the
    pinned root on it.
    """
    cloud = trust.profile.name
    label = f"{common_name(ca.subject)} (sha256 {fingerprint(ca)})"
    if digests(ca) & trust.removed:
        raise FetchRefused("removed", f"{label} was unpinned with certs remove ({cloud}/intermediates/removed.txt)")
    if not is_ca(ca) or is_self_signed(ca):
        raise FetchRefused("invalid", f"{label} is not an intermediate CA")
    pin = next((pin for pin in trust.fingerprint_pins if pin.matches(ca)), None)
    if pin is None:
        if cloud in policy.fingerprint_only:
            raise FetchRefused("unpinned", f"{label} is not pinned by fingerprint, and {cloud} takes no other "
                                           "issuing CA from an AIA URL")
        if not _organizations(ca.subject) & set(policy.organizations.get(cloud, ())):
            raise FetchRefused("invalid", f"{label} is not operated by an organisation this cloud's documents use")
    try:
        ca_path(ca, trust, now)
    except AttestError as exc:
        raise FetchRefused("untrusted", exc.message) from exc
    return pin


def proven_issuer(signer: x509.Certificate, candidates: Sequence[x509.Certificate], trust: CloudTrust, *,
                  policy: AiaPolicy, now: datetime) -> x509.Certificate | None:
    """The first of ``candidates`` proven to be ``signer``'s issuing CA, or None.

    Proven: it passes :func:`accept_issuing_ca` (not removed, an intermediate CA, pinned by fingerprint or of
    the cloud's organisation, chaining to a pinned root of the cloud at ``now``) and :func:`check_issued`
    (the signer names it and its signature on the signer verifies). A name and a URL in a document prove
    nothing (anyone can write them); this is what lets an unpinned issuer be named to the operator.
    """
    for candidate in candidates:
        if candidate.subject != signer.issuer:
            continue
        try:
            check_issued(candidate, signer)
            accept_issuing_ca(candidate, trust, policy=policy, now=now)
        except FetchRefused:
            continue
        return candidate
    return None


def check_issued(ca: x509.Certificate, signer: x509.Certificate) -> None:
    """Raise FetchRefused (``not_issuer``) unless ``ca`` is named as ``signer``'s issuer and signed it."""
    name = common_name(ca.subject)
    if ca.subject != signer.issuer:
        raise FetchRefused("not_issuer", f"{name} is not the signer's issuer {common_name(signer.issuer)}")
    try:
        signer.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise FetchRefused("not_issuer", f"{name} did not issue the signer's certificate") from exc
