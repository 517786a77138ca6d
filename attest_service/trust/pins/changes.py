"""``certs add`` and ``certs remove``: change one cloud's intermediates, all or nothing.

Each change writes its files atomically and keeps ``manifest.json`` in step; a refused change leaves the
directory untouched. :func:`remove_pin` records the removed fingerprint in ``intermediates/removed.txt``
first, so that a removed CA stays distrusted even where the AIA fallback could fetch it again or its file
comes back; pinning the CA again takes it off that list: add and remove are each other's inverse.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.errors import AttestError, ConfigurationError, DocumentExpired, DocumentNotYetValid
from attest_service.trust.certificates import ca_issuers_urls, ca_path, is_ca, is_self_signed
from attest_service.trust.issuers import (
    AiaPolicy,
    CertificateFetcher,
    FetchRefused,
    accept_issuing_ca,
    check_issued,
)
from attest_service.trust.loading import (
    FINGERPRINT_LIST,
    REMOVED_LIST,
    load_certificates,
    load_trust,
    loose_digests,
    manifest_entry,
    normalise_digest,
)
from attest_service.trust.pins.atomic import atomic_write
from attest_service.trust.pins.manifest import (
    fingerprint_manifest_entry,
    manifest_key,
    pin_file,
    read_manifest,
    rewrite_list,
    write_manifest,
)
from attest_service.verify import (
    CloudTrust,
    DocumentVerifier,
    FingerprintPin,
    PinnedCertificate,
    TrustStore,
    VerificationPolicy,
    common_name,
    decode,
    digests,
    fingerprint,
    signer_certificate,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PinChange:
    """One file written or removed by ``certs add``/``certs remove``."""

    cloud: str
    file: str
    subject: str
    sha256: str
    action: Literal["added", "removed", "already_pinned"]

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"cloud": self.cloud, "file": self.file, "subject": self.subject, "sha256": self.sha256,
                "action": self.action}


def pin_filename(certificate: x509.Certificate) -> str:
    """File name of a pin: a slug of its CN and a fingerprint prefix (unique across rotations)."""
    slug = re.sub(r"[^a-z0-9]+", "-", common_name(certificate.subject).lower()).strip("-")[:64] or "certificate"
    return f"{slug}-{fingerprint(certificate)[:16]}.pem"


_REMOVED_HEADER: Final = ("# Fingerprints of CAs unpinned with certs remove: never trusted again, neither as a file "
                          "nor from a URL by the AIA fallback. certs add takes a CA off this list.")


def _refuse_broken_removal(directory: Path, cloud: str, found: Iterable[str]) -> None:
    """Refuse to pin a CA that a line of the removed list names without being a well-formed entry.

    Such a line cannot be rewritten without the CA on it (it may name others too), so the CA would stay
    removed after the add; the operator fixes the line first.
    """
    wanted = set(found)
    path = directory / cloud / "intermediates" / REMOVED_LIST
    if not path.is_file():
        return
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = line.partition("#")[0].strip()
        if not text or normalise_digest(text.split()[0]) is not None:
            continue
        if wanted & loose_digests(text):
            raise ConfigurationError(f"{cloud}/intermediates/{REMOVED_LIST}:{number} names this CA on a line that is "
                                     "not a fingerprint entry: fix or delete that line first")


def _forget_removed(directory: Path, cloud: str, found: Iterable[str]) -> None:
    """Take ``found`` digests off the cloud's removed list (an operator pins the CA again)."""
    wanted = set(found)
    path = directory / cloud / "intermediates" / REMOVED_LIST
    if path.is_file() and wanted & load_trust(directory).for_cloud(cloud).removed:
        rewrite_list(path, keep=lambda digest: digest not in wanted)


def _record_removed(directory: Path, cloud: str, entries: Sequence[tuple[str, str]], now: datetime) -> None:
    """Add ``(digest, description)`` entries to the cloud's removed list."""
    path = directory / cloud / "intermediates" / REMOVED_LIST
    already = load_trust(directory).for_cloud(cloud).removed
    lines = [f"{digest}  # {description}, removed on {now.date().isoformat()}"
             for digest, description in entries if digest not in already]
    if lines:
        rewrite_list(path, append=lines, header=_REMOVED_HEADER)


def _refuse_candidate(certificate: x509.Certificate, cloud_trust: CloudTrust, others: Sequence[x509.Certificate],
                      now: datetime) -> None:
    label = f"{common_name(certificate.subject)} (sha256 {fingerprint(certificate)})"
    if not is_ca(certificate):
        raise ConfigurationError(f"{label} is not a CA (basicConstraints): a leaf cannot be pinned as an intermediate")
    if is_self_signed(certificate):
        raise ConfigurationError(f"{label} is a self-signed root: roots are pinned by editing <cloud>/roots, "
                         "not with certs add")
    if certificate.not_valid_after_utc < now:
        raise ConfigurationError(f"{label} expired on {certificate.not_valid_after_utc.isoformat()}")
    if certificate.not_valid_before_utc > now:
        raise ConfigurationError(f"{label} is not valid before {certificate.not_valid_before_utc.isoformat()}")
    try:
        ca_path(certificate, cloud_trust, now, extra=others)
    except AttestError as exc:
        raise ConfigurationError(
            f"{label} does not chain to a {cloud_trust.profile.name} root now: {exc.message}") from exc


def add_pins(directory: Path, cloud: str, data: bytes, *, origin: str, now: datetime,
             source: str | None = None) -> list[PinChange]:
    """Validate the certificates in ``data`` (PEM or DER) and pin them as intermediates of ``cloud``.

    Every certificate must be a CA, not a self-signed root, valid at ``now`` and chain to a root of the
    cloud (through its pinned intermediates or the other certificates of ``data``). Raises ConfigurationError
    (nothing written) otherwise. Already pinned certificates are reported and left as they are. A
    certificate whose file is in the directory but left out because ``removed.txt`` lists it is trusted
    again through that file (not written twice); every certificate of ``data`` comes off ``removed.txt``.
    """
    trust = load_trust(directory)
    cloud_trust = trust.for_cloud(cloud)
    certificates = load_certificates(data, origin=origin)
    pinned = {pin.sha256: pin for pin in cloud_trust.intermediates}
    restored = {pin.sha256: pin for pin in cloud_trust.excluded if pin.role == "intermediate"}
    for certificate in certificates:
        if fingerprint(certificate) not in pinned:
            _refuse_candidate(certificate, cloud_trust, [c for c in certificates if c is not certificate], now)
    _refuse_broken_removal(directory, cloud, set().union(*(digests(c) for c in certificates)))
    recorded = {manifest_key(e) for e in read_manifest(directory) or []}
    changes: list[PinChange] = []
    entries: list[dict[str, str]] = []
    written: list[tuple[Path, x509.Certificate]] = []
    for certificate in certificates:
        digest = fingerprint(certificate)
        if digest in pinned:
            changes.append(PinChange(cloud=cloud, file=pin_file(pinned[digest]), subject=pinned[digest].subject_cn,
                                     sha256=digest, action="already_pinned"))
            continue
        pin = restored.get(digest)
        if pin is None:
            relative = f"{cloud}/intermediates/{pin_filename(certificate)}"
            pin = PinnedCertificate(cloud=cloud, role="intermediate", certificate=certificate,
                                    source=f"file:{relative}")
            written.append((directory / relative, certificate))
        if (cloud, "intermediate", pin_file(pin), digest) not in recorded:
            entries.append(manifest_entry(pin, source or f"certs add {origin} on {now.date().isoformat()}"))
        changes.append(PinChange(cloud=cloud, file=pin_file(pin), subject=pin.subject_cn, sha256=digest,
                                 action="added"))
    for path, certificate in written:
        atomic_write(path, certificate.public_bytes(serialization.Encoding.PEM))
    # An operator pinning a CA again means it: it comes off the removed list the AIA fallback honours.
    _forget_removed(directory, cloud, set().union(*(digests(c) for c in certificates)))
    if entries:
        write_manifest(trust, directory, add=entries)
    return changes


_FINGERPRINT_HEADER: Final = ("# Issuing CAs pinned by fingerprint: SHA256-or-SHA1-HEX  URL-or--  # name. The AIA "
                              "fallback fetches such a CA from its URL and accepts exactly these bytes.")


#: Longest name recorded for a fingerprint pin, in characters.
MAX_FINGERPRINT_NAME_CHARS: Final = 200


def add_fingerprint_pin(directory: Path, cloud: str, digest: str, *, url: str | None, name: str, now: datetime,
                        source: str | None = None, policy: AiaPolicy | None = None) -> PinChange:
    """Pin an intermediate of ``cloud`` by its SHA-256 (or SHA-1) ``digest``, to be fetched from ``url``.

    ``url`` None means any caIssuers URL on the cloud's allow-list. Raises ConfigurationError (nothing
    written) for a malformed digest, or a URL the cloud's AIA allow-list does not hold (it would never be
    fetched). A digest already pinned (as a file or a fingerprint) is reported and left as it is.
    """
    trust = load_trust(directory)
    cloud_trust = trust.for_cloud(cloud)
    parsed = normalise_digest(digest)
    if parsed is None:
        raise ConfigurationError(f"{digest[:100]!r} is not a SHA-256 (64 hex digits) or SHA-1 (40) fingerprint")
    algorithm, value = parsed
    policy = policy if policy is not None else AiaPolicy.azure()
    if cloud not in policy.allow:
        raise ConfigurationError(f"{cloud} has no AIA allow-list: a fingerprint pin could never be fetched")
    if url is not None and not policy.allowed(cloud, url):
        raise ConfigurationError(f"{url[:200]} is not on the {cloud} AIA allow-list: it would never be fetched")
    label = " ".join(name.split())[:MAX_FINGERPRINT_NAME_CHARS] or value
    relative = f"{cloud}/intermediates/{FINGERPRINT_LIST}"
    pinned = set().union(*(digests(pin.certificate) for pin in cloud_trust.intermediates))
    if value in pinned or any(pin.digest == value for pin in cloud_trust.fingerprint_pins):
        return PinChange(cloud=cloud, file=relative, subject=label, sha256=value, action="already_pinned")
    pin = FingerprintPin(cloud=cloud, algorithm=algorithm, digest=value, url=url, name=label,
                         source=f"fingerprint:{relative}")
    _refuse_broken_removal(directory, cloud, {value})
    rewrite_list(directory / relative, append=[f"{value}  {url or '-'}  # {label}"], header=_FINGERPRINT_HEADER)
    _forget_removed(directory, cloud, {value})
    write_manifest(trust, directory, add_fingerprints=[fingerprint_manifest_entry(
        pin, source or f"certs add --fingerprint on {now.date().isoformat()}")])
    return PinChange(cloud=cloud, file=relative, subject=label, sha256=value, action="added")


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentPin:
    """What :func:`add_from_document` did: the pins written, and where the issuer came from."""

    changes: tuple[PinChange, ...]
    issuer: str
    origin: str
    #: The other certificates of the issuer file, not pinned (``subject (sha256 ...)`` each).
    ignored: tuple[str, ...] = ()


def add_from_document(directory: Path, cloud: str, document: bytes, *, now: datetime,
                      issuer: bytes | None = None, issuer_origin: str = "issuer file",
                      fetcher: CertificateFetcher | None = None, policy: AiaPolicy | None = None,
                      source: str | None = None) -> DocumentPin:
    """Pin the issuing CA of the signer of ``document`` (an IMDS response, or its base64 or DER) for ``cloud``.

    The CA comes from ``issuer`` (PEM or DER: the one certificate of it that is named as the signer's issuer
    and signed it; the file's other certificates are not pinned, not used and listed in
    :attr:`DocumentPin.ignored`) or, without it, from the signer's caIssuers URL through ``fetcher``
    (default: public addresses only) under the AIA fallback's rules (:mod:`attest_service.trust.issuers`:
    the allow-list; not removed; pinned by fingerprint or of the cloud's organisation; China by fingerprint
    only). Either way it must be named as the signer's issuer and have signed it, chain to a root of
    ``cloud`` through the pins already there now, and the document must pass every step up to the chain with
    it pinned (its age does not matter: an old document shows who signs as well as a fresh one). Then that
    one CA is pinned as :func:`add_pins` does. Raises ConfigurationError, with nothing written, otherwise.
    """
    policy = policy if policy is not None else AiaPolicy.azure()
    fetcher = fetcher if fetcher is not None else CertificateFetcher()
    trust = load_trust(directory)
    cloud_trust = trust.for_cloud(cloud)
    try:
        der = decode(document)
        signer = signer_certificate(der)
    except AttestError as exc:
        raise ConfigurationError(f"not an attested document: {exc.code}: {exc.message}") from exc
    ignored: tuple[str, ...] = ()
    if issuer is not None:
        offered = load_certificates(issuer, origin=issuer_origin)
        # The issuer is the certificate that signed the signer, not any certificate carrying its name: a file
        # may hold an impostor of the same name, and only the one CA the document proves is pinned.
        ca = next((c for c in offered if _issued(c, signer)), None)
        if ca is None:
            named = sum(1 for c in offered if c.subject == signer.issuer)
            why = f"{named} named so did not issue it" if named else "none is named so"
            raise ConfigurationError(f"{issuer_origin} holds no certificate that issued the document's signer "
                                     f"(the signer's issuer is {signer.issuer.rfc4514_string()}; {why})")
        ignored = tuple(f"{common_name(c.subject)} (sha256 {fingerprint(c)})" for c in offered if c is not ca)
        origin = issuer_origin
    else:
        try:
            url = policy.fetch_url(cloud_trust, ca_issuers_urls(signer))
            ca = fetcher.fetch(url)
            accept_issuing_ca(ca, cloud_trust, policy=policy, now=now)
        except FetchRefused as exc:
            raise ConfigurationError(f"the signer's issuer cannot be taken from its caIssuers URL: {exc.result}: "
                                     f"{exc.message}") from exc
        origin = url
        try:
            check_issued(ca, signer)
        except FetchRefused as exc:
            raise ConfigurationError(exc.message) from exc
    label = f"{common_name(ca.subject)} (sha256 {fingerprint(ca)})"
    # Only the pins already there may complete its path: whatever else the file held is not pinned.
    _refuse_candidate(ca, cloud_trust, [], now)
    candidate = PinnedCertificate(cloud=cloud, role="intermediate", certificate=ca, source=f"candidate:{origin}")
    with_candidate = TrustStore(clouds={**trust.clouds, cloud: dataclasses.replace(
        cloud_trust, intermediates=(*cloud_trust.intermediates, candidate))}, directory=trust.directory)
    try:
        DocumentVerifier(with_candidate).verify(der, policy=VerificationPolicy(cloud=cloud), now=now)
    except (DocumentExpired, DocumentNotYetValid):
        pass  # every step up to the chain passed; the document's own validity window is not the question
    except AttestError as exc:
        raise ConfigurationError(f"the document does not verify for {cloud} with {label} pinned: {exc.code}: "
                                 f"{exc.message}") from exc
    changes = add_pins(directory, cloud, ca.public_bytes(serialization.Encoding.PEM), origin=origin, now=now,
                       source=source or f"certs add --from-document: {origin} on {now.date().isoformat()}")
    return DocumentPin(changes=tuple(changes), issuer=label, origin=origin, ignored=ignored)


def _issued(ca: x509.Certificate, signer: x509.Certificate) -> bool:
    """True when ``ca`` is named as ``signer``'s issuer and its key verifies the signer's signature."""
    try:
        check_issued(ca, signer)
    except FetchRefused:
        return False
    return True


def remove_pin(directory: Path, cloud: str, which: str, *, now: datetime | None = None) -> PinChange:
    """Unpin the intermediate of ``cloud`` named by fingerprint (SHA-256 or SHA-1 hex) or file name.

    A file holding several certificates is rewritten without the one named by fingerprint; naming the
    file removes all of it. A fingerprint also removes a fingerprint pin with it. Each removed CA's
    fingerprint is recorded in ``intermediates/removed.txt`` first, so that the AIA fallback never takes it
    from a URL again. Raises ConfigurationError, with nothing written, when nothing matches.
    """
    trust = load_trust(directory)
    cloud_trust = trust.for_cloud(cloud)
    parsed = normalise_digest(which)
    wanted = parsed[1] if parsed is not None else None
    # A file left out for removed.txt is still removed: certs remove deletes what certs add would restore.
    files = (*cloud_trust.intermediates, *(pin for pin in cloud_trust.excluded if pin.role == "intermediate"))
    matches = [pin for pin in files
               if (wanted in digests(pin.certificate) if wanted is not None else
                   pin.path is not None and which.strip() in (pin.path.name, pin_file(pin)))]
    by_fingerprint = [pin for pin in cloud_trust.fingerprint_pins if pin.digest == wanted]
    if not matches and not by_fingerprint:
        kind = "fingerprint" if wanted is not None else "file name"
        raise ConfigurationError(f"no pinned {cloud} intermediate has {kind} {which!r}")
    # Recorded before anything goes: from this moment the fallback refuses them, even while a file is still there.
    _record_removed(directory, cloud, [*((pin.sha256, pin.subject_cn) for pin in matches),
                                       *((pin.digest, pin.name) for pin in by_fingerprint)],
                    now if now is not None else datetime.now(UTC))
    if matches:
        path = matches[0].path
        assert path is not None  # noqa: S101 - intermediates are always files
        siblings = [pin for pin in files if pin.path == path and pin not in matches]
        if siblings:
            atomic_write(path, b"".join(p.certificate.public_bytes(serialization.Encoding.PEM) for p in siblings))
        else:
            path.unlink()
    if by_fingerprint:
        rewrite_list(directory / cloud / "intermediates" / FINGERPRINT_LIST, keep=lambda digest: digest != wanted)
    write_manifest(trust, directory, drop=[(cloud, "intermediate", pin_file(p), p.sha256) for p in matches],
                    drop_fingerprints=[(cloud, p.digest, p.url or "-") for p in by_fingerprint])
    if not matches:
        first = by_fingerprint[0]
        return PinChange(cloud=cloud, file=f"{cloud}/intermediates/{FINGERPRINT_LIST}", subject=first.name,
                         sha256=first.digest, action="removed")
    first_pin = matches[0]
    return PinChange(cloud=cloud, file=pin_file(first_pin), subject=", ".join(p.subject_cn for p in matches),
                     sha256=", ".join(p.sha256 for p in matches), action="removed")
