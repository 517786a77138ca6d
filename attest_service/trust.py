"""Pinned trust material: the roots and intermediates each cloud's documents must chain through.

Layout of a pinned directory (``ATTEST_PINNED_CERTS``, default the bundled ``pinned_certs/``)::

    <cloud>/roots/*.pem            roots shipped as files (those certifi no longer carries)
    <cloud>/roots/certifi.txt      SHA-256 fingerprints of roots to take from certifi's bundle
    <cloud>/intermediates/*.pem    pinned issuing CAs; the only intermediates a chain may use
    manifest.json                  provenance of every file (checked by the test suite and ``certs check``)

Certificates carried inside a document are never added here: a chain runs through these pins only.
This module does the file I/O; the verification core receives the loaded :class:`TrustStore`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification

from attest_service.clouds import CLOUDS, CloudProfile
from attest_service.errors import ConfigurationError
from attest_service.files import read_bounded

Role = Literal["root", "intermediate"]

#: File in ``<cloud>/roots/`` naming roots to take from certifi, one SHA-256 (hex) per line.
CERTIFI_LIST: Final = "certifi.txt"
#: Provenance manifest at the top of a pinned directory.
MANIFEST: Final = "manifest.json"
#: Refuse to read larger files: a pinned PEM is a few KiB, and the directory may be operator-mounted.
MAX_PEM_BYTES: Final = 256 * 1024

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)


def fingerprint(certificate: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    return certificate.fingerprint(hashes.SHA256()).hex()


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
class CloudTrust:
    """The roots and pinned intermediates of one cloud, ready for chain building."""

    profile: CloudProfile
    roots: tuple[PinnedCertificate, ...]
    intermediates: tuple[PinnedCertificate, ...]
    #: Problems found while loading (a certifi root that certifi no longer carries, ...): reported by
    #: ``certs check``; they narrow trust, never widen it.
    problems: tuple[str, ...] = ()
    _store: verification.Store | None = field(default=None, init=False, repr=False, compare=False)
    _intermediate_certs: tuple[x509.Certificate, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The verification Store is built once per load: building it per request would cost more than
        # the whole rest of a verification. An empty Store is not allowed by cryptography, so a cloud
        # without roots (germany by default) keeps None and every chain for it is untrusted.
        store = verification.Store([pin.certificate for pin in self.roots]) if self.roots else None
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_intermediate_certs", tuple(p.certificate for p in self.intermediates))

    @property
    def store(self) -> verification.Store | None:
        """The root store for chain building, or None when the cloud has no roots."""
        return self._store

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


def bundled_pinned_dir() -> Path:
    """The pins shipped with the package: ``attest_service/pinned_certs`` inside an installed wheel.

    pyproject.toml maps the repository's top-level ``pinned_certs/`` into the package, so a wheel (and a wheel
    built from the sdist) carries the very files the repository holds. A source checkout or an editable install
    has no copy inside the package; there the pins are the checkout's own top-level directory, beside it.
    """
    package = Path(str(resources.files("attest_service")))
    installed = package / "pinned_certs"
    return installed if installed.is_dir() else package.parent / "pinned_certs"


def load_certificates(data: bytes, *, origin: str) -> list[x509.Certificate]:
    """Parse one or more certificates from PEM or DER ``data``; raise ConfigurationError naming ``origin``."""
    try:
        if b"-----BEGIN" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ConfigurationError(f"{origin}: not a certificate ({exc})") from exc
    if not certificates:
        raise ConfigurationError(f"{origin}: no certificate found")
    return certificates


def _read_limited(path: Path) -> bytes:
    return read_bounded(path, MAX_PEM_BYTES, what="pinned certificates")


def _certifi_index() -> dict[str, bytes]:
    """Map SHA-256 -> DER for every certificate in certifi's bundle, without parsing them all.

    Parsing the whole bundle would be slower and would emit cryptography's deprecation warnings for
    a few legacy roots we never use; hashing the base64-decoded PEM bodies needs no parser.
    """
    index: dict[str, bytes] = {}
    for match in _PEM_BLOCK.finditer(Path(certifi.where()).read_bytes()):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error:
            continue
        index[hashlib.sha256(der).hexdigest()] = der
    return index


def _read_certifi_list(path: Path) -> list[str]:
    wanted = []
    for raw in _read_limited(path).decode("utf-8", "replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        digest = line.split()[0].lower().replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ConfigurationError(f"{path}: {line!r} is not a SHA-256 fingerprint")
        wanted.append(digest)
    return wanted


def _load_dir(directory: Path, cloud: str, role: Role, base: Path) -> list[PinnedCertificate]:
    pins: list[PinnedCertificate] = []
    if not directory.is_dir():
        return pins
    for path in sorted(directory.glob("*.pem")):
        for certificate in load_certificates(_read_limited(path), origin=str(path)):
            relative = path.relative_to(base).as_posix()
            pins.append(PinnedCertificate(cloud=cloud, role=role, certificate=certificate,
                                          source=f"file:{relative}", path=path))
    return pins


def load_trust(directory: Path) -> TrustStore:
    """Load the pinned directory; raise ConfigurationError if it is missing or holds an unusable file."""
    if not directory.is_dir():
        raise ConfigurationError(f"pinned certificate directory {directory} does not exist")
    certifi_index: dict[str, bytes] | None = None
    clouds: dict[str, CloudTrust] = {}
    for name, profile in CLOUDS.items():
        cloud_dir = directory / name
        roots = _load_dir(cloud_dir / "roots", name, "root", directory)
        problems: list[str] = []
        certifi_list = cloud_dir / "roots" / CERTIFI_LIST
        if certifi_list.is_file():
            if certifi_index is None:
                certifi_index = _certifi_index()
            for digest in _read_certifi_list(certifi_list):
                der = certifi_index.get(digest)
                if der is None:
                    problems.append(f"{name}: root {digest} listed in {CERTIFI_LIST} is not in certifi")
                    continue
                with warnings.catch_warnings():
                    # A root we asked for by fingerprint is well formed; the filter only guards against
                    # cryptography's advisory warnings turning into errors under strict warning settings.
                    warnings.simplefilter("ignore")
                    certificate = x509.load_der_x509_certificate(der)
                roots.append(PinnedCertificate(cloud=name, role="root", certificate=certificate,
                                               source="certifi"))
        intermediates = _load_dir(cloud_dir / "intermediates", name, "intermediate", directory)
        clouds[name] = CloudTrust(profile=profile, roots=tuple(roots), intermediates=tuple(intermediates),
                                  problems=tuple(problems))
    return TrustStore(clouds=MappingProxyType(clouds), directory=directory)


def manifest_entry(pin: PinnedCertificate, source: str) -> dict[str, str]:
    """The manifest record of one pinned file: what a reader needs to audit it."""
    return {
        "cloud": pin.cloud,
        "role": pin.role,
        "file": pin.source.removeprefix("file:"),
        "subject": pin.certificate.subject.rfc4514_string(),
        "issuer": pin.certificate.issuer.rfc4514_string(),
        "sha256": pin.sha256,
        "not_after": pin.not_after.isoformat(),
        "source": source,
    }
