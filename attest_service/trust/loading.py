"""Pinned trust material: the roots and intermediates each cloud's documents must chain through.

Layout of a pinned directory (``ATTEST_PINNED_CERTS``, default the bundled ``pinned_certs/``)::

    <cloud>/roots/*.pem                     roots shipped as files (those certifi no longer carries)
    <cloud>/roots/certifi.txt               SHA-256 fingerprints of roots to take from certifi's bundle
    <cloud>/intermediates/*.pem             pinned issuing CAs; the only intermediates a chain may use
    <cloud>/intermediates/fingerprints.txt  issuing CAs pinned by fingerprint, with the URL to fetch them from
    <cloud>/intermediates/removed.txt       fingerprints ``certs remove`` unpinned: never trusted again
    <cloud>/crls/*.crl                      CRLs of the cloud's pinned CAs (DER or PEM): see trust/crls.py
    manifest.json                           provenance of every pin (checked by the tests and ``certs check``)

Certificates carried inside a document are never added here: a chain runs through these pins only. This
module does the file I/O; the verification core receives the loaded :class:`TrustStore` (:func:`load_trust`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Final

import certifi
from cryptography import x509

from attest_service.clouds import CLOUDS
from attest_service.errors import ConfigurationError
from attest_service.files import read_bounded
from attest_service.trust.crls import CRL_FOLDER, MAX_CRL_BYTES, load_crls
from attest_service.verify.trust import (
    CloudTrust,
    DigestAlgorithm,
    FingerprintPin,
    PinnedCertificate,
    Role,
    TrustStore,
    digests,
)

#: File in ``<cloud>/roots/`` naming roots to take from certifi, one SHA-256 (hex) per line.
CERTIFI_LIST: Final = "certifi.txt"
#: File in ``<cloud>/intermediates/`` pinning issuing CAs by fingerprint: ``DIGEST  URL|-  # name`` per line.
FINGERPRINT_LIST: Final = "fingerprints.txt"
#: File in ``<cloud>/intermediates/`` listing the fingerprints ``certs remove`` unpinned, one per line.
REMOVED_LIST: Final = "removed.txt"
#: Provenance manifest at the top of a pinned directory.
MANIFEST: Final = "manifest.json"
#: Refuse to read larger files: a pinned PEM is a few KiB, and the directory may be operator-mounted.
MAX_PEM_BYTES: Final = 256 * 1024

#: A SHA-256 or SHA-1 hex digest anywhere in a line (colons between byte pairs allowed), lower case.
_LOOSE_DIGEST: Final = re.compile(r"(?<![0-9a-f])(?:[0-9a-f]{64}|[0-9a-f]{40}|(?:[0-9a-f]{2}:){31}[0-9a-f]{2}|"
                                  r"(?:[0-9a-f]{2}:){19}[0-9a-f]{2})(?![0-9a-f:])")
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
#: Hex digest lengths of the fingerprints a list may hold.
_DIGEST_ALGORITHMS: Final[dict[int, DigestAlgorithm]] = {64: "sha256", 40: "sha1"}
#: The files each role's directory may hold besides ``*.pem``.
_LISTS: Final[dict[Role, frozenset[str]]] = {"root": frozenset({CERTIFI_LIST}),
                                            "intermediate": frozenset({FINGERPRINT_LIST, REMOVED_LIST})}


#: The variable naming an operator's pinned directory (the contract's ``ATTEST_PINNED_CERTS``).
PINNED_CERTS_ENV: Final = "ATTEST_PINNED_CERTS"


def pinned_dir_from_env(env: Mapping[str, str]) -> Path:
    """The pinned directory ``env`` names with ``ATTEST_PINNED_CERTS``, else the bundled pins."""
    value = env.get(PINNED_CERTS_ENV)
    return Path(value) if value else bundled_pinned_dir()


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
        # cryptography's words ("Unable to load PEM file. See https://cryptography.io/...") stay the cause.
        raise ConfigurationError(f"{origin}: not an X.509 certificate in PEM or DER") from exc
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


def normalise_digest(text: str) -> tuple[DigestAlgorithm, str] | None:
    """``(algorithm, lower-case hex)`` for a SHA-256 or SHA-1 hex digest (colons allowed), else None."""
    digest = text.strip().lower().replace(":", "")
    algorithm = _DIGEST_ALGORITHMS.get(len(digest))
    if algorithm is None or not re.fullmatch(r"[0-9a-f]+", digest):
        return None
    return algorithm, digest


def _list_lines(path: Path) -> list[tuple[int, str, str]]:
    """``(line number, text before '#', comment)`` of every non-empty line of a list file."""
    lines = []
    for number, raw in enumerate(_read_limited(path).decode("utf-8", "replace").splitlines(), start=1):
        text, _, comment = raw.partition("#")
        if text.strip():
            lines.append((number, text.strip(), comment.strip()))
    return lines


def _read_fingerprint_list(path: Path, cloud: str, base: Path) -> list[FingerprintPin]:
    pins = []
    relative = path.relative_to(base).as_posix()
    for number, text, comment in _list_lines(path):
        fields = text.split()
        parsed = normalise_digest(fields[0])
        if parsed is None or len(fields) > 2:
            raise ConfigurationError(f"{path}:{number}: expected 'SHA256-or-SHA1-HEX  URL-or--  # name', "
                                     f"got {text[:120]!r}")
        url = fields[1] if len(fields) == 2 and fields[1] != "-" else None
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"{path}:{number}: {url[:120]!r} is not an http or https URL")
        algorithm, digest = parsed
        pins.append(FingerprintPin(cloud=cloud, algorithm=algorithm, digest=digest, url=url,
                                   name=comment or digest, source=f"fingerprint:{relative}:{number}"))
    return pins


def _read_removed_list(path: Path, base: Path) -> tuple[frozenset[str], tuple[str, ...]]:
    """``(digests, errors)`` of a removed list: it never fails a load, since every line can only distrust.

    A line whose first field is a fingerprint removes that CA. Any other line is an error, named with its
    line number, and every SHA-256 or SHA-1 hex run written in it (outside the comment) still removes that
    CA: refusing the whole file would keep a trust that may hold the very CA the operator meant to remove.
    """
    removed = set()
    errors = []
    relative = path.relative_to(base).as_posix()
    for number, text, _ in _list_lines(path):
        parsed = normalise_digest(text.split()[0])
        if parsed is not None:
            removed.add(parsed[1])
            continue
        found = loose_digests(text)
        removed.update(found)
        outcome = (f"the fingerprint{'s' if len(found) > 1 else ''} in it {'are' if len(found) > 1 else 'is'} "
                   "applied all the same" if found else "it removes nothing")
        errors.append(f"{relative}:{number}: {text[:120]!r} is not a SHA-256 or SHA-1 fingerprint (expected "
                      f"'HEX  # comment'): {outcome}")
    return frozenset(removed), tuple(errors)


def loose_digests(text: str) -> frozenset[str]:
    """Every SHA-256 or SHA-1 hex digest written anywhere in ``text`` (colons allowed), lower case."""
    return frozenset(match.replace(":", "") for match in _LOOSE_DIGEST.findall(text.lower()))


def read_removed(directory: Path) -> dict[str, frozenset[str]]:
    """The digests each cloud's removed list names now, for a directory that may not load as a whole.

    Never raises: a cloud whose list cannot be read at all is left out (its load error says why).
    """
    removed: dict[str, frozenset[str]] = {}
    for name in CLOUDS:
        path = directory / name / "intermediates" / REMOVED_LIST
        try:
            if path.is_file():
                removed[name] = _read_removed_list(path, directory)[0]
        except (OSError, ConfigurationError):
            continue
    return removed


def _exclude(trust: CloudTrust, removed: frozenset[str]) -> CloudTrust:
    """``trust`` with ``removed`` added to its removed digests and every pinned certificate they name excluded."""
    removed = trust.removed | removed
    excluded = tuple(pin for pin in (*trust.roots, *trust.intermediates) if digests(pin.certificate) & removed)
    return dataclasses.replace(trust, roots=tuple(pin for pin in trust.roots if pin not in excluded),
                               intermediates=tuple(pin for pin in trust.intermediates if pin not in excluded),
                               removed=removed, excluded=(*trust.excluded, *excluded))


def without_removed(trust: TrustStore, removed: Mapping[str, frozenset[str]]) -> TrustStore:
    """``trust`` minus every CA ``removed`` (from :func:`read_removed`) names per cloud.

    ``trust`` itself when that removes nothing new. The reload applies a removal to the last good trust with
    it when the directory does not load.
    """
    changed = {name: _exclude(cloud, removed[name]) for name, cloud in trust.clouds.items()
               if not removed.get(name, frozenset()) <= cloud.removed}
    if not changed:
        return trust
    return dataclasses.replace(trust, clouds=MappingProxyType({**trust.clouds, **changed}))


def _load_dir(directory: Path, cloud: str, role: Role, base: Path,
              ignored: list[str]) -> list[PinnedCertificate]:
    pins: list[PinnedCertificate] = []
    if not directory.is_dir():
        return pins
    for path in sorted(directory.iterdir()):
        relative = path.relative_to(base).as_posix()
        if path.name.startswith("."):
            continue
        if path.is_dir():
            ignored.append(f"{relative}: a directory; only files directly in {directory.name}/ are read")
            continue
        if path.name in _LISTS[role]:
            continue
        if path.suffix != ".pem":
            ignored.append(f"{relative}: not loaded: only *.pem files are pins (rename it to .pem if it is one)")
            continue
        pins.extend(PinnedCertificate(cloud=cloud, role=role, certificate=certificate, source=f"file:{relative}",
                                      path=path)
                    for certificate in load_certificates(_read_limited(path), origin=str(path)))
    return pins


def load_trust(directory: Path) -> TrustStore:
    """Load the pinned directory; raise ConfigurationError if it is missing or holds an unusable file.

    Any other file under ``roots/`` or ``intermediates/`` (a pin saved as ``.crt``, say) is not loaded and is
    named in :attr:`CloudTrust.ignored`, so that ``certs check`` and the reload's log report it. Hidden files
    (a ConfigMap volume's ``..data``, an editor's temporary file, ``.keep``) are passed over in silence.

    A certificate whose SHA-256 or SHA-1 ``removed.txt`` lists is not trusted in that cloud, whatever else says
    so: a pinned file holding it (under ``roots/`` or ``intermediates/``: a removed pin copied back by hand or
    restored from a backup) is left out of the trust and named in :attr:`CloudTrust.excluded`, for ``certs
    check`` and the reload's log; the AIA fallback never takes it from a URL. Only ``certs add`` (which takes it
    off the list) or deleting its line brings it back.

    ``removed.txt`` fails closed and never fails a load: every line whose first field is a fingerprint removes
    that CA; a line that is not one is named with its line number in :attr:`CloudTrust.removed_errors` (for
    ``certs check`` and the reload's log), and any SHA-256 or SHA-1 hex written in it outside the comment
    removes that CA all the same. Failing the load instead would keep the last good trust, which may hold the
    very CA the line was meant to remove. When the directory does not load for another reason, the reload
    still applies the removed lists it can read to the last good trust (:func:`without_removed`). So once
    ``removed.txt`` names a CA, no document chaining through it verifies, whatever else is broken; the one
    exception is a ``removed.txt`` that cannot be read at all (unreadable, over the size limit), which fails
    the load like any unreadable file.
    """
    try:
        return _load_trust(directory)
    except OSError as exc:  # a folder or list that cannot be read: a failed load, never an exception past it
        raise ConfigurationError(f"{exc.filename or directory}: cannot read ({exc.strerror})") from exc


def _load_trust(directory: Path) -> TrustStore:
    if not directory.is_dir():
        raise ConfigurationError(f"pinned certificate directory {directory} does not exist")
    certifi_index: dict[str, bytes] | None = None
    clouds: dict[str, CloudTrust] = {}
    for name, profile in CLOUDS.items():
        cloud_dir = directory / name
        ignored: list[str] = []
        roots = _load_dir(cloud_dir / "roots", name, "root", directory, ignored)
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
        intermediates = _load_dir(cloud_dir / "intermediates", name, "intermediate", directory, ignored)
        fingerprint_list = cloud_dir / "intermediates" / FINGERPRINT_LIST
        fingerprint_pins = (_read_fingerprint_list(fingerprint_list, name, directory)
                            if fingerprint_list.is_file() else [])
        removed_list = cloud_dir / "intermediates" / REMOVED_LIST
        removed, removed_errors = (_read_removed_list(removed_list, directory) if removed_list.is_file()
                                   else (frozenset(), ()))
        pinned = _exclude(CloudTrust(profile=profile, roots=tuple(roots), intermediates=tuple(intermediates),
                                     problems=tuple(problems), fingerprint_pins=tuple(fingerprint_pins),
                                     ignored=tuple(ignored), removed_errors=removed_errors), removed)
        # CRLs last: each is checked against the pins the cloud trusts (removed ones excluded).
        clouds[name] = load_crls(pinned, cloud_dir / CRL_FOLDER, directory)
    return TrustStore(clouds=MappingProxyType(clouds), directory=directory)


def excluded_message(pin: PinnedCertificate) -> str:
    """Why a pinned file's certificate is not trusted (:attr:`CloudTrust.excluded`) and what brings it back."""
    again = ("certs add it to trust it again (that takes it off the list)" if pin.role == "intermediate" else
             "delete its line from the list to trust it again (roots are not added with certs add)")
    return (f"{pin.role} {pin.subject_cn} ({pin.source}, sha256 {pin.sha256}) is listed in {pin.cloud}/intermediates/"
            f"{REMOVED_LIST} and is not trusted: {again}, or delete the file")


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


#: Entries looked at per fingerprint; a pinned directory holds tens. Beyond this the directory is refused
#: rather than read for ever (a mount pointed at the wrong tree).
MAX_DIRECTORY_ENTRIES: Final = 10_000

#: One entry the loader reads: its path (``path -> target`` for a symbolic link, ``path/`` for a folder),
#: file type, size, device, inode, modification and change times (-1 throughout: absent).
FingerprintEntry = tuple[str, int, int, int, int, int, int, str]
Fingerprint = tuple[FingerprintEntry, ...]
_ABSENT: Final = (-1, -1, -1, -1, -1, -1, "")
#: Bytes of a file that go into its content digest: beyond the largest file the loader accepts, it refuses.
_DIGEST_LIMIT: Final = max(MAX_PEM_BYTES, MAX_CRL_BYTES) + 1


def directory_fingerprint(directory: Path) -> Fingerprint:
    """What :func:`load_trust` would read from ``directory``: each entry's metadata and content digest.

    For each cloud, the folders ``roots/``, ``intermediates/`` and ``crls/`` (which directory each resolves to,
    through any symbolic link: a retargeted link is a change) and every entry directly in them but hidden
    ones, as the loader lists them: file type, size, device, inode, modification and change time, each
    symbolic link's target, and the SHA-256 of each regular file's content. That changes with every way of
    editing the pins: in-place writes, ``os.replace``, the symlink swap of a Kubernetes ConfigMap volume, a
    folder mounted from elsewhere. The content digest is there because the times alone miss a rewrite of the
    same size within one tick of the file system's clock (coarse on kernels before 6.13). Nothing the loader
    does not read is looked at, so an unreadable or huge tree beside the pins changes nothing. Every
    fingerprint has an entry per cloud and folder, so the empty tuple is none. Raises ConfigurationError when
    the directory is missing or what the loader reads cannot be listed or read.
    """
    if not directory.is_dir():
        raise ConfigurationError(f"pinned certificate directory {directory} does not exist")
    entries: list[FingerprintEntry] = []
    try:
        for cloud in CLOUDS:
            for part in ("roots", "intermediates", CRL_FOLDER):
                folder = directory / cloud / part
                label = f"{cloud}/{part}/"
                if not folder.is_dir():
                    entries.append((label, *_ABSENT))
                    continue
                # Which directory the folder is, not its times: those move for a hidden editor file too.
                kind, _size, device, inode, _mtime, _ctime, _digest = _metadata(folder)
                entries.append((label, kind, 0, device, inode, 0, 0, ""))
                for path in sorted(folder.iterdir()):
                    if path.name.startswith("."):
                        continue  # the loader skips hidden entries
                    name = label + path.name
                    if path.is_symlink():
                        entries.append((f"{name} -> {path.readlink()}", *_ABSENT))
                    entries.append((name, *_metadata(path)))
                    if len(entries) > MAX_DIRECTORY_ENTRIES:
                        raise ConfigurationError(f"{directory}: more than {MAX_DIRECTORY_ENTRIES} entries")
    except OSError as exc:
        raise ConfigurationError(f"{exc.filename or directory}: cannot read ({exc.strerror})") from exc
    return tuple(entries)


def _metadata(path: Path) -> tuple[int, int, int, int, int, int, str]:
    try:
        info = path.stat()  # through symbolic links, as the loader reads
    except FileNotFoundError:
        return _ABSENT  # a dangling link: recorded with its target; the load that follows reports it
    digest = _content_digest(path) if stat.S_ISREG(info.st_mode) else ""
    return (stat.S_IFMT(info.st_mode), info.st_size, info.st_dev, info.st_ino, info.st_mtime_ns,
            info.st_ctime_ns, digest)


def _content_digest(path: Path) -> str:
    """SHA-256 of a regular file's content, read as the loader reads it; "" if it is no longer a regular file."""
    # O_NONBLOCK: a FIFO put in the file's place since the stat must not make the check wait for a writer.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return ""
        return hashlib.sha256(handle.read(_DIGEST_LIMIT)).hexdigest()
