"""Step 6, revocation: the certificates on a validated path, against the trust directory's CRLs (RFC 5280 6.3).

Pure: the CRLs arrive already loaded and checked (:mod:`attest_service.trust.crls` accepts a CRL only when its
signature verifies under the pinned CA it names as issuer), the instant is passed in, and nothing here reads a
file or the network. Each :class:`RevocationList` holds the revoked serial numbers as a ``frozenset`` built at
load, so a lookup costs one hash probe whatever the CRL's size.

Every certificate on the path except the root is looked up in the CRLs of its issuer that are current at the
instant (``thisUpdate`` <= instant <= ``nextUpdate``). An issuer is a name *and* a key: a CRL counts for the
certificates whose issuer's subject and public key are those of the CA that signed the CRL, so a CA
cross-signed under two roots (same name, same key) shares one CRL, and a CA re-keyed under the same name does
not. Listed in any current CRL of its issuer: :class:`~attest_service.errors.CertificateRevoked`, whatever the
mode. No current CRL covering it: the mode decides (``soft`` accepts and reports it, ``hard`` refuses with
:class:`~attest_service.errors.RevocationUnknown`, ``off`` does not look at all).

A CRL covers a certificate unless its issuingDistributionPoint narrows it (RFC 5280 5.2.5): to end-entity
certificates only, to CA certificates only, or to the certificates whose cRLDistributionPoints name its
distribution point. Listing is judged from every current CRL of the issuer (a serial number is unique per
issuer), coverage from the CRLs whose scope includes the certificate.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.errors import CertificateRevoked, ConfigurationError, RevocationUnknown

#: What a verification does about revocation (the contract's ``ATTEST_REVOCATION``).
RevocationMode = Literal["off", "soft", "hard"]
#: Every mode, in the order the documentation lists them.
REVOCATION_MODES: Final[tuple[RevocationMode, ...]] = ("off", "soft", "hard")
#: The default: check where a current CRL exists, accept (and count) where none does.
DEFAULT_REVOCATION: Final[RevocationMode] = "soft"


def revocation_mode(value: str, *, origin: str = "revocation") -> RevocationMode:
    """``value`` as a :data:`RevocationMode`; raises ConfigurationError naming ``origin`` otherwise."""
    for mode in REVOCATION_MODES:
        if value == mode:
            return mode
    raise ConfigurationError(f"{origin}: expected one of {', '.join(REVOCATION_MODES)}, got {str(value)[:40]!r}")


def issuer_key(ca: x509.Certificate) -> bytes:
    """The identity of ``ca`` as an issuer: its subject's DER and its SubjectPublicKeyInfo's DER."""
    return ca.subject.public_bytes() + ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def distribution_point_names(points: Iterable[x509.DistributionPoint]) -> frozenset[str]:
    """The URIs of the full names of ``points`` (the form Azure's CAs use)."""
    return frozenset(name.value for point in points for name in (point.full_name or ())
                     if isinstance(name, x509.UniformResourceIdentifier))


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationList:
    """One CRL whose signature verified under a pinned CA: what the lookup needs, and where it came from."""

    cloud: str
    #: :func:`issuer_key` of the pinned CA that signed it.
    issuer: bytes
    #: The issuer's common name (for messages, metric labels and listings).
    issuer_name: str
    this_update: datetime
    next_update: datetime
    serials: frozenset[int]
    #: Where it was loaded from, relative to the trust directory (``public/crls/ca01.crl``).
    source: str
    #: The cRLNumber extension, when present.
    number: int | None = None
    #: Whether it covers end-entity and CA certificates (issuingDistributionPoint onlyContains...).
    covers_end_entities: bool = True
    covers_cas: bool = True
    #: The issuingDistributionPoint's URIs: it covers only certificates naming one of them; None: every one.
    distribution_points: frozenset[str] | None = None

    def current(self, instant: datetime) -> bool:
        """``thisUpdate`` <= ``instant`` <= ``nextUpdate``."""
        return self.this_update <= instant <= self.next_update

    def covers(self, link: PathLink) -> bool:
        """Whether this CRL's scope includes the certificate of ``link``."""
        if not (self.covers_cas if link.is_ca else self.covers_end_entities):
            return False
        return self.distribution_points is None or bool(self.distribution_points & link.distribution_points)


@dataclass(frozen=True, slots=True)
class PathLink:
    """One certificate on a path with what its lookup needs: its serial, its issuer, its kind, its CRL URIs."""

    serial: int
    issuer: bytes
    is_ca: bool
    distribution_points: frozenset[str]
    #: The certificate's subject (RFC 4514), for messages.
    subject: str


def path_links(chain: Sequence[x509.Certificate]) -> tuple[PathLink, ...]:
    """The certificates of ``chain`` (leaf first, root last) that are looked up: all but the root.

    Computed once per validated chain (the verifier caches it beside the chain).
    """
    links = []
    for certificate, issuer in itertools.pairwise(chain):
        try:
            is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        try:
            points = distribution_point_names(
                certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
        except x509.ExtensionNotFound:
            points = frozenset()
        links.append(PathLink(serial=certificate.serial_number, issuer=issuer_key(issuer), is_ca=is_ca,
                              distribution_points=points, subject=certificate.subject.rfc4514_string()))
    return tuple(links)


def index_by_issuer(crls: Iterable[RevocationList]) -> Mapping[bytes, tuple[RevocationList, ...]]:
    """``crls`` grouped by :attr:`RevocationList.issuer`, built once per loaded trust."""
    grouped: dict[bytes, list[RevocationList]] = {}
    for crl in crls:
        grouped.setdefault(crl.issuer, []).append(crl)
    return MappingProxyType({issuer: tuple(found) for issuer, found in grouped.items()})


def check_revocation(links: Sequence[PathLink], crls: Mapping[bytes, tuple[RevocationList, ...]],
                     mode: RevocationMode, instant: datetime) -> int:
    """Look every link up in its issuer's current CRLs at ``instant``; return how many no current CRL covers.

    Raises CertificateRevoked when a current CRL of its issuer lists one (in ``soft`` and ``hard``), and
    RevocationUnknown in ``hard`` when no current CRL covers one. ``off`` returns 0 without looking.
    """
    if mode == "off":
        return 0
    unknown = 0
    for link in links:
        covered = False
        for crl in crls.get(link.issuer, ()):
            if not crl.current(instant):
                continue
            if link.serial in crl.serials:
                raise CertificateRevoked(
                    f"{link.subject} (serial {link.serial:x}) is revoked: listed in {crl.source}, the CRL of "
                    f"{crl.issuer_name} current from {crl.this_update.isoformat()} to {crl.next_update.isoformat()}")
            covered = covered or crl.covers(link)
        if not covered:
            if mode == "hard":
                raise RevocationUnknown(f"no current CRL of {_issuer_label(crls, link)} covers {link.subject} "
                                        f"(serial {link.serial:x}) at {instant.isoformat()}")
            unknown += 1
    return unknown


def _issuer_label(crls: Mapping[bytes, tuple[RevocationList, ...]], link: PathLink) -> str:
    known = crls.get(link.issuer, ())
    return known[0].issuer_name if known else "its issuer"


__all__: Final = ["DEFAULT_REVOCATION", "REVOCATION_MODES", "PathLink", "RevocationList", "RevocationMode",
                  "check_revocation", "distribution_point_names", "index_by_issuer", "issuer_key", "path_links",
                  "revocation_mode"]
