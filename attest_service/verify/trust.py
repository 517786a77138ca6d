"""The trust model the core verifies against: pinned certificates, one cloud's trust, the whole store.

Pure values, no I/O: :mod:`attest_service.trust` loads them from a pinned directory (and certifi), and
:class:`~attest_service.verify.DocumentVerifier` receives them ready built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification

from attest_service.clouds import CLOUDS, CloudProfile
from attest_service.verify.revocation import RevocationList, index_by_issuer

#: Whether a pin is a trust anchor or an issuing CA a chain may pass through.
Role = Literal["root", "intermediate"]
#: Digests a fingerprint pin may name. SHA-1 only identifies bytes fetched from an allow-listed URL, whose
#: chain is still validated; see :mod:`attest_service.trust.issuers`.
DigestAlgorithm = Literal["sha256", "sha1"]


def fingerprint(certificate: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def digests(certificate: x509.Certificate) -> frozenset[str]:
    """The lower-case hex SHA-256 and SHA-1 of the certificate's DER: every form a fingerprint pin may take."""
    return frozenset((fingerprint(certificate),
                      certificate.fingerprint(hashes.SHA1()).hex()))  # noqa: S303 - an identifier, see DigestAlgorithm


def common_name(name: x509.Name) -> str:
    """The first CN of ``name``, or its RFC 4514 string when it has none."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if attrs:
        value = attrs[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return name.rfc4514_string()


@dataclass(frozen=True, slots=True, kw_only=True)
class PinnedCertificate:
    """One pinned certificate with where it came from (``file`` path relative to the directory, or certifi)."""

    cloud: str
    role: Role
    certificate: x509.Certificate
    source: str
    path: Path | None = None

    @property
    def sha256(self) -> str:
        """Hex SHA-256 fingerprint."""
        return fingerprint(self.certificate)

    @property
    def subject_cn(self) -> str:
        """Common name of the subject, for listings and messages."""
        return common_name(self.certificate.subject)

    @property
    def not_after(self) -> datetime:
        """End of validity (aware, UTC)."""
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True, kw_only=True)
class FingerprintPin:
    """An intermediate pinned by fingerprint only (``<cloud>/intermediates/fingerprints.txt``).

    Its bytes are not in the directory, so the chain builder never uses it: the AIA fallback and
    ``certs add --from-document`` fetch the certificate and accept exactly the one with this digest, which
    must still be a CA chaining to a root of the cloud. ``url`` is where it may be fetched from; ``None``
    means any caIssuers URL on the cloud's allow-list.
    """

    cloud: str
    algorithm: DigestAlgorithm
    digest: str
    url: str | None
    name: str
    source: str

    def matches(self, certificate: x509.Certificate) -> bool:
        """True when ``certificate``'s DER has this digest."""
        algorithm = hashes.SHA256() if self.algorithm == "sha256" else hashes.SHA1()  # noqa: S303 - see DigestAlgorithm
        return certificate.fingerprint(algorithm).hex() == self.digest


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudTrust:
    """The roots and pinned intermediates of one cloud, ready for chain building."""

    profile: CloudProfile
    roots: tuple[PinnedCertificate, ...]
    intermediates: tuple[PinnedCertificate, ...]
    #: Problems found while loading (a certifi root that certifi no longer carries, ...): reported by
    #: ``certs check``; they narrow trust, never widen it.
    problems: tuple[str, ...] = ()
    #: Intermediates pinned by fingerprint; never chain candidates themselves (they have no bytes here).
    fingerprint_pins: tuple[FingerprintPin, ...] = ()
    #: Digests (SHA-256 or SHA-1 hex) of CAs ``certs remove`` unpinned (``intermediates/removed.txt``): such a
    #: CA is trusted neither as a pinned file (see ``excluded``) nor from a URL by the AIA fallback.
    removed: frozenset[str] = frozenset()
    #: Pinned files' certificates left out of ``roots`` and ``intermediates`` because ``removed`` lists them
    #: (a removed pin copied back by hand): reported, and trusted again only once taken off the list.
    excluded: tuple[PinnedCertificate, ...] = ()
    #: Lines of ``removed.txt`` that are not a fingerprint, each as ``file:line: reason``: reported, never
    #: a reason to fail the load (a removed list can only distrust).
    removed_errors: tuple[str, ...] = ()
    #: Files under ``roots/`` or ``intermediates/`` that were not loaded (a pin saved as ``.crt``, a stray
    #: directory), each with the reason: reported, because such a file silently trusts less than intended.
    ignored: tuple[str, ...] = ()
    #: The CRLs of ``<cloud>/crls/`` whose signature verified under a pin of this cloud (step 6, revocation).
    crls: tuple[RevocationList, ...] = ()
    #: Files under ``crls/`` that are not used (malformed, forged, of a CA not pinned here), each with the
    #: reason: ``certs check`` fails on them, the reload logs them.
    crl_problems: tuple[str, ...] = ()
    _store: verification.Store | None = field(default=None, init=False, repr=False, compare=False)
    _intermediate_certs: tuple[x509.Certificate, ...] = field(default=(), init=False, repr=False, compare=False)
    _crl_index: Mapping[bytes, tuple[RevocationList, ...]] = field(default_factory=dict, init=False, repr=False,
                                                                   compare=False)

    def __post_init__(self) -> None:
        # The verification Store is built once per load: building it per request would cost more than
        # the whole rest of a verification. An empty Store is not allowed by cryptography, so a cloud
        # without roots (germany by default) keeps None and every chain for it is untrusted.
        store = verification.Store([pin.certificate for pin in self.roots]) if self.roots else None
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_intermediate_certs", tuple(p.certificate for p in self.intermediates))
        object.__setattr__(self, "_crl_index", index_by_issuer(self.crls))

    @property
    def store(self) -> verification.Store | None:
        """The root store for chain building, or None when the cloud has no roots."""
        return self._store

    @property
    def crls_by_issuer(self) -> Mapping[bytes, tuple[RevocationList, ...]]:
        """:attr:`crls` by the issuer key of the CA that signed each (the revocation lookup of step 6)."""
        return self._crl_index

    @property
    def intermediate_certificates(self) -> tuple[x509.Certificate, ...]:
        """The pinned intermediates, the only ones a chain may pass through."""
        return self._intermediate_certs


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustStore:
    """Trust material for every cloud, loaded once and swapped whole on reload."""

    clouds: Mapping[str, CloudTrust]
    directory: Path | None = None

    def for_cloud(self, name: str) -> CloudTrust:
        """The trust of cloud ``name``; a cloud missing from the directory trusts nothing."""
        trust = self.clouds.get(name)
        if trust is None:
            return CloudTrust(profile=CLOUDS[name], roots=(), intermediates=())
        return trust

    def all_pins(self) -> Iterable[PinnedCertificate]:
        """Every pinned certificate of every cloud, roots first."""
        for trust in self.clouds.values():
            yield from trust.roots
            yield from trust.intermediates
