"""Operating the pinned trust: list, check, add, remove and explain, and the ``certs`` command.

Each operation is a function that returns data (the command only formats it), so the same checks serve
the CLI, the tests and a CI gate. The operations:

- :func:`list_pins`: every pinned certificate with its status and the root each intermediate chains to.
- :func:`check_pins`: the problems an operator must act on (expired, expiring, unchained, not a CA,
  duplicate, certifi root missing, manifest out of sync). Expired pins are *retired*: they are kept on
  purpose so old documents can be verified at their own instant (``verify --at``), so ``--allow-retired``
  turns them into notes, as long as each still chains to a root inside its own validity.
- :func:`add_pins` / :func:`remove_pin`: change one cloud's intermediates atomically (temporary file and
  ``os.replace``) and keep ``manifest.json`` in step; a refused change leaves the directory untouched.
- :func:`explain_document`: which verification step a document fails and, for a chain failure, which
  issuer it needs, where its AIA points and whether that issuer is pinned anywhere.

Path validation is the verification core's (``verify/chain.py`` policies and cryptography's RFC 5280
path builder); nothing here builds chains by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import AuthorityInformationAccessOID

from attest_service.cli import (
    EXIT_REFUSED,
    EXIT_VERIFIED,
    UsageError,
    add_pinned_certs_option,
    load_trust_or_usage,
    parse_instant,
    pinned_dir,
)
from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import (
    AttestError,
    CertificateExpired,
    ConfigurationError,
    UntrustedChain,
)
from attest_service.trust import (
    CERTIFI_LIST,
    MANIFEST,
    MAX_PEM_BYTES,
    CloudTrust,
    PinnedCertificate,
    TrustStore,
    common_name,
    fingerprint,
    load_certificates,
    load_trust,
    manifest_entry,
)
from attest_service.verify import VerificationPolicy, Verifier, decode_document
from attest_service.verify.chain import CA_POLICY, MAX_INTERMEDIATES
from attest_service.verify.names import cloud_for_signer
from attest_service.verify.verifier import signer_certificate

if TYPE_CHECKING:
    from attest_service.cli import Subparsers

#: Default of ``check --warn-days``: a month leaves time to stage a successor pin (the contract's default).
DEFAULT_WARN_DAYS: Final = 30
#: Largest accepted document for ``explain``, in bytes (an IMDS response is about 8 KiB).
MAX_DOCUMENT_BYTES: Final = 256 * 1024

_ONE_SECOND: Final = timedelta(seconds=1)
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")

Status = Literal["active", "expiring", "retired", "not_yet_valid"]
ProblemKind = Literal["expired", "expiring", "unchained", "not_ca", "duplicate", "certifi_missing", "manifest"]


# --- chain helpers shared with the AIA fallback ---------------------------------------------------


def is_ca(certificate: x509.Certificate) -> bool:
    """True when basicConstraints is present and marks the certificate as a CA (RFC 5280 4.2.1.9)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca


def is_self_signed(certificate: x509.Certificate) -> bool:
    """True when the certificate names itself as issuer and its signature verifies under its own key."""
    if certificate.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ca_path(
    certificate: x509.Certificate,
    trust: CloudTrust,
    instant: datetime,
    *,
    extra: Sequence[x509.Certificate] = (),
) -> tuple[x509.Certificate, ...]:
    """Validate that CA ``certificate`` chains to a root of ``trust`` at ``instant``; return the path.

    The path may run through the cloud's pinned intermediates and ``extra`` (other certificates being
    pinned together). The CA extension policy of the verification core is applied to every certificate,
    including the one being checked. Raises UntrustedChain when there is no path, CertificateExpired
    when a certificate on every path is outside its validity at ``instant``.
    """
    if trust.store is None:
        raise UntrustedChain(f"cloud {trust.profile.name} has no pinned roots")
    if not is_ca(certificate):
        raise UntrustedChain(f"{common_name(certificate.subject)} is not a CA (basicConstraints)")
    if not certificate.not_valid_before_utc <= instant <= certificate.not_valid_after_utc:
        raise CertificateExpired(
            f"{common_name(certificate.subject)} is valid {certificate.not_valid_before_utc.isoformat()} to "
            f"{certificate.not_valid_after_utc.isoformat()}, not at {instant.isoformat()}")
    verifier = (
        verification.PolicyBuilder()
        .store(trust.store)
        .time(instant)
        .max_chain_depth(MAX_INTERMEDIATES)
        .extension_policies(ca_policy=CA_POLICY, ee_policy=CA_POLICY)
        .build_client_verifier()
    )
    candidates = [*trust.intermediate_certificates, *extra]
    try:
        chain = verifier.verify(certificate, [c for c in candidates if c != certificate]).chain
    except verification.VerificationError as exc:
        raise UntrustedChain(f"{common_name(certificate.subject)} does not chain to a {trust.profile.name} root "
                             f"at {instant.isoformat()} ({exc})") from exc
    return tuple(chain)


def _anchor_instant(certificate: x509.Certificate, now: datetime) -> datetime:
    """``now``, or the last second of the certificate's validity when it has expired (for retired pins)."""
    return min(now, certificate.not_valid_after_utc - _ONE_SECOND)


def ca_issuers_urls(certificate: x509.Certificate) -> tuple[str, ...]:
    """The caIssuers URIs of the Authority Information Access extension (RFC 5280 4.2.2.1), in order."""
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(
        str(description.access_location.value)
        for description in aia
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    )


# --- list -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PinReport:
    """One pinned certificate as ``certs list`` shows it."""

    cloud: str
    role: str
    subject: str
    issuer: str
    not_after: datetime
    days_left: int
    status: Status
    sha256: str
    source: str
    chains_to: str | None

    def to_dict(self) -> dict[str, object]:
        """JSON form (``certs list --json``)."""
        return {
            "cloud": self.cloud, "role": self.role, "subject": self.subject, "issuer": self.issuer,
            "notAfter": self.not_after.isoformat(), "daysLeft": self.days_left, "status": self.status,
            "sha256": self.sha256, "source": self.source, "chainsTo": self.chains_to,
        }


def _status(pin: PinnedCertificate, now: datetime, warn: timedelta) -> Status:
    if pin.not_after < now:
        return "retired"
    if pin.certificate.not_valid_before_utc > now:
        return "not_yet_valid"
    if pin.not_after - now <= warn:
        return "expiring"
    return "active"


def _chains_to(pin: PinnedCertificate, trust: CloudTrust, now: datetime) -> str | None:
    """CN of the root the intermediate chains to, at now or (retired) at the end of its own validity."""
    try:
        path = ca_path(pin.certificate, trust, _anchor_instant(pin.certificate, now))
    except AttestError:
        return None
    return common_name(path[-1].subject)


def list_pins(trust: TrustStore, *, now: datetime, warn_days: int = DEFAULT_WARN_DAYS) -> list[PinReport]:
    """Every pinned certificate of every cloud, roots first, with its status and anchoring root."""
    warn = timedelta(days=warn_days)
    reports = []
    for pin in trust.all_pins():
        cloud_trust = trust.for_cloud(pin.cloud)
        chains_to = common_name(pin.certificate.subject) if pin.role == "root" else _chains_to(pin, cloud_trust, now)
        reports.append(PinReport(
            cloud=pin.cloud, role=pin.role, subject=pin.subject_cn, issuer=common_name(pin.certificate.issuer),
            not_after=pin.not_after, days_left=(pin.not_after - now).days, status=_status(pin, now, warn),
            sha256=pin.sha256, source=pin.source, chains_to=chains_to,
        ))
    return reports


# --- check ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One finding of ``certs check``, naming the certificate (or file) it is about."""

    kind: ProblemKind
    cloud: str
    subject: str
    sha256: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """JSON form (``certs check --json``)."""
        return {"kind": self.kind, "cloud": self.cloud, "subject": self.subject, "sha256": self.sha256,
                "message": self.message}

    def __str__(self) -> str:
        return f"{self.kind}: {self.cloud}: {self.message}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What ``certs check`` found: ``problems`` fail the check, ``notes`` (retired pins allowed) do not."""

    problems: tuple[Problem, ...]
    notes: tuple[Problem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when nothing needs the operator's action."""
        return not self.problems


def _pin_problems(pin: PinnedCertificate, trust: CloudTrust, now: datetime, warn: timedelta) -> list[Problem]:
    name = f"{pin.role} {pin.subject_cn} ({pin.source}, sha256 {pin.sha256})"
    found: list[Problem] = []

    def problem(kind: ProblemKind, message: str) -> None:
        found.append(Problem(kind=kind, cloud=pin.cloud, subject=pin.subject_cn, sha256=pin.sha256,
                             message=f"{name} {message}"))

    if not is_ca(pin.certificate):
        problem("not_ca", "is not a CA (basicConstraints CA is absent or false)")
        return found
    status = _status(pin, now, warn)
    if status == "retired":
        problem("expired", f"expired on {pin.not_after.isoformat()}")
    elif status == "expiring":
        problem("expiring", f"expires on {pin.not_after.isoformat()}, in {(pin.not_after - now).days} days")
    if pin.role == "intermediate":
        instant = _anchor_instant(pin.certificate, now)
        try:
            ca_path(pin.certificate, trust, instant)
        except AttestError as exc:
            when = "now" if instant == now else "at the end of its validity"
            problem("unchained", f"does not chain to a {pin.cloud} root {when}: {exc.message}")
    return found


def _duplicates(trust: CloudTrust) -> list[Problem]:
    seen: dict[str, PinnedCertificate] = {}
    found = []
    for pin in (*trust.roots, *trust.intermediates):
        first = seen.setdefault(pin.sha256, pin)
        if first is not pin:
            found.append(Problem(kind="duplicate", cloud=pin.cloud, subject=pin.subject_cn, sha256=pin.sha256,
                                 message=f"{pin.subject_cn} (sha256 {pin.sha256}) is pinned twice: "
                                         f"{first.source} ({first.role}) and {pin.source} ({pin.role})"))
    return found


def _manifest_key(entry: dict[str, str]) -> tuple[str, str, str, str]:
    return (entry.get("cloud", ""), entry.get("role", ""), entry.get("file", ""), entry.get("sha256", ""))


def read_manifest(directory: Path) -> list[dict[str, str]] | None:
    """The entries of ``manifest.json``, or None when the directory has none.

    Raises ConfigurationError when the file exists but is not a manifest.
    """
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: unreadable manifest ({exc})") from exc
    entries = document.get("certificates") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and all(isinstance(v, str) for v in e.values()) for e in entries):
        raise ConfigurationError(f"{path}: expected {{\"certificates\": [{{...}}, ...]}} with string fields")
    return entries


def _pin_file(pin: PinnedCertificate) -> str:
    if pin.source == "certifi":
        return f"{pin.cloud}/roots/{CERTIFI_LIST}"
    return pin.source.removeprefix("file:")


def _manifest_problems(trust: TrustStore) -> list[Problem]:
    assert trust.directory is not None  # noqa: S101 - a loaded TrustStore always knows its directory
    try:
        entries = read_manifest(trust.directory)
    except ConfigurationError as exc:
        return [Problem(kind="manifest", cloud="-", subject=MANIFEST, sha256="-", message=exc.message)]
    if entries is None:
        return [Problem(kind="manifest", cloud="-", subject=MANIFEST, sha256="-",
                        message=f"{MANIFEST} is missing: pins have no recorded provenance")]
    recorded = {_manifest_key(e) for e in entries}
    found = []
    present = set()
    for pin in trust.all_pins():
        key = (pin.cloud, pin.role, _pin_file(pin), pin.sha256)
        present.add(key)
        if key not in recorded:
            found.append(Problem(kind="manifest", cloud=pin.cloud, subject=pin.subject_cn, sha256=pin.sha256,
                                 message=f"{_pin_file(pin)} ({pin.subject_cn}, sha256 {pin.sha256}) is not "
                                         f"in {MANIFEST}"))
    for cloud, role, file, sha256 in sorted(recorded - present):
        found.append(Problem(kind="manifest", cloud=cloud, subject=file, sha256=sha256,
                             message=f"{MANIFEST} lists {role} {file} (sha256 {sha256}), which is not pinned"))
    return found


def check_pins(trust: TrustStore, *, now: datetime, warn_days: int = DEFAULT_WARN_DAYS,
               allow_retired: bool = False) -> CheckReport:
    """Every problem of the pinned trust at ``now``; see the module docstring for ``allow_retired``."""
    warn = timedelta(days=warn_days)
    problems: list[Problem] = []
    for cloud_trust in trust.clouds.values():
        for pin in (*cloud_trust.roots, *cloud_trust.intermediates):
            problems.extend(_pin_problems(pin, cloud_trust, now, warn))
        problems.extend(_duplicates(cloud_trust))
        problems.extend(Problem(kind="certifi_missing", cloud=cloud_trust.profile.name, subject=CERTIFI_LIST,
                                sha256="-", message=message) for message in cloud_trust.problems)
    problems.extend(_manifest_problems(trust))
    if not allow_retired:
        return CheckReport(problems=tuple(problems))
    retired = tuple(p for p in problems if p.kind == "expired")
    return CheckReport(problems=tuple(p for p in problems if p.kind != "expired"), notes=retired)


# --- add and remove -------------------------------------------------------------------------------


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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    A reader (the service's reload) sees the old file or the new one, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        Path(temporary).chmod(0o644)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(temporary).unlink()
        raise


def pin_filename(certificate: x509.Certificate) -> str:
    """File name of a pin: a slug of its CN and a fingerprint prefix (unique across rotations)."""
    slug = re.sub(r"[^a-z0-9]+", "-", common_name(certificate.subject).lower()).strip("-")[:64] or "certificate"
    return f"{slug}-{fingerprint(certificate)[:16]}.pem"


def _write_manifest(trust: TrustStore, directory: Path, *, add: Iterable[dict[str, str]] = (),
                    drop: Iterable[tuple[str, str, str, str]] = ()) -> None:
    entries = read_manifest(directory)
    if entries is None:
        # First change to a directory without a manifest: record what is already there, saying honestly
        # that its origin is unknown, so that the manifest describes every pin from now on.
        entries = [manifest_entry(pin, "unrecorded (pinned before the manifest existed)")
                   | {"file": _pin_file(pin)} for pin in trust.all_pins()]
    dropped = set(drop)
    kept = [e for e in entries if _manifest_key(e) not in dropped]
    document = {"certificates": [*kept, *add]}
    _atomic_write(directory / MANIFEST, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode())


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
    (nothing written) otherwise. Already pinned certificates are reported and left as they are.
    """
    trust = load_trust(directory)
    cloud_trust = trust.for_cloud(cloud)
    certificates = load_certificates(data, origin=origin)
    pinned = {pin.sha256: pin for pin in cloud_trust.intermediates}
    for certificate in certificates:
        if fingerprint(certificate) not in pinned:
            _refuse_candidate(certificate, cloud_trust, [c for c in certificates if c is not certificate], now)
    changes: list[PinChange] = []
    entries: list[dict[str, str]] = []
    for certificate in certificates:
        digest = fingerprint(certificate)
        if digest in pinned:
            changes.append(PinChange(cloud=cloud, file=_pin_file(pinned[digest]), subject=pinned[digest].subject_cn,
                                     sha256=digest, action="already_pinned"))
            continue
        relative = f"{cloud}/intermediates/{pin_filename(certificate)}"
        pin = PinnedCertificate(cloud=cloud, role="intermediate", certificate=certificate, source=f"file:{relative}")
        entries.append(manifest_entry(pin, source or f"certs add {origin} on {now.date().isoformat()}"))
        changes.append(PinChange(cloud=cloud, file=relative, subject=pin.subject_cn, sha256=digest, action="added"))
    for change, certificate in zip(changes, certificates, strict=True):
        if change.action == "added":
            _atomic_write(directory / change.file, certificate.public_bytes(serialization.Encoding.PEM))
    if entries:
        _write_manifest(trust, directory, add=entries)
    return changes


def remove_pin(directory: Path, cloud: str, which: str) -> PinChange:
    """Unpin the intermediate of ``cloud`` named by SHA-256 (hex) or file name; ConfigurationError if none matches.

    A file holding several certificates is rewritten without the one named by fingerprint; naming the
    file removes all of it.
    """
    trust = load_trust(directory)
    wanted = which.strip().lower().replace(":", "")
    by_digest = bool(_SHA256_HEX.fullmatch(wanted))
    matches = [pin for pin in trust.for_cloud(cloud).intermediates
               if (pin.sha256 == wanted if by_digest else
                   pin.path is not None and which.strip() in (pin.path.name, _pin_file(pin)))]
    if not matches:
        kind = "SHA-256" if by_digest else "file name"
        raise ConfigurationError(f"no pinned {cloud} intermediate has {kind} {which!r}")
    path = matches[0].path
    assert path is not None  # noqa: S101 - intermediates are always files
    siblings = [pin for pin in trust.for_cloud(cloud).intermediates if pin.path == path and pin not in matches]
    if siblings:
        _atomic_write(path, b"".join(p.certificate.public_bytes(serialization.Encoding.PEM) for p in siblings))
    else:
        path.unlink()
    _write_manifest(trust, directory, drop=[(cloud, "intermediate", _pin_file(p), p.sha256) for p in matches])
    first = matches[0]
    return PinChange(cloud=cloud, file=_pin_file(first), subject=", ".join(p.subject_cn for p in matches),
                     sha256=", ".join(p.sha256 for p in matches), action="removed")


# --- explain --------------------------------------------------------------------------------------

#: The verification step (verifier.py's numbering) each error code stops at.
STEP_OF_CODE: Final = {
    "malformed_document": "1-2 decode and parse (base64, DER, PKCS7) or 7 claims",
    "unsupported_document": "2 parse: outside what is supported",
    "signature_invalid": "4 signature",
    "subject_mismatch": "5 signer name",
    "untrusted_chain": "6 chain to a pinned root",
    "certificate_expired": "6 chain: validity at the instant",
    "document_expired": "8 validity window (expiresOn)",
    "document_not_yet_valid": "8 validity window (createdOn)",
    "nonce_mismatch": "9 nonce",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    """Why a document verifies or not, and for a chain failure what the trust lacks."""

    verified: bool
    step: str | None
    error: dict[str, str] | None
    cloud: str | None = None
    signer_subject: str | None = None
    signer_issuer: str | None = None
    ca_issuers: tuple[str, ...] = ()
    #: Whether the document's cloud pins a certificate named as the signer's issuer; ``issuer_pins`` lists
    #: such pins in every cloud (a pin present for another cloud is a common cause).
    issuer_pinned: bool = False
    issuer_pins: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON form (``certs explain --json``)."""
        return {"verified": self.verified, "step": self.step, "error": self.error, "cloud": self.cloud,
                "signer": None if self.signer_subject is None else {
                    "subject": self.signer_subject, "issuer": self.signer_issuer,
                    "caIssuers": list(self.ca_issuers)},
                "issuerPinned": self.issuer_pinned, "issuerPins": list(self.issuer_pins)}


def explain_document(data: bytes, trust: TrustStore, *, cloud: str = AUTO, now: datetime) -> Explanation:
    """Run the verification core on ``data`` (as ``verify`` reads it) and explain the outcome; no network."""
    try:
        document = decode_document(data)
    except AttestError as exc:
        return Explanation(verified=False, step=STEP_OF_CODE.get(exc.code, exc.code), error=exc.to_dict())
    try:
        Verifier(trust).verify(document, policy=VerificationPolicy(cloud=cloud), now=now)
    except AttestError as exc:
        step = STEP_OF_CODE.get(exc.code, exc.code)
        if exc.code not in ("untrusted_chain", "certificate_expired"):
            return Explanation(verified=False, step=step, error=exc.to_dict())
        signer = signer_certificate(document)
        # The chain step runs after the name step, so the signer's name does select a cloud here.
        target = cloud_for_signer(signer).name if cloud == AUTO else cloud
        pins = [pin for pin in trust.all_pins() if pin.certificate.subject == signer.issuer]
        return Explanation(verified=False, step=step, error=exc.to_dict(), cloud=target,
                           signer_subject=signer.subject.rfc4514_string(),
                           signer_issuer=signer.issuer.rfc4514_string(),
                           ca_issuers=ca_issuers_urls(signer),
                           issuer_pinned=any(pin.cloud == target for pin in pins),
                           issuer_pins=tuple(f"{pin.cloud}: {pin.source}" for pin in pins))
    return Explanation(verified=True, step=None, error=None)


# --- the command ----------------------------------------------------------------------------------


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _complain(text: str) -> None:
    sys.stderr.write(text + "\n")


def _now(args: argparse.Namespace) -> datetime:
    at: datetime | None = getattr(args, "at", None)
    return at if at is not None else datetime.now(UTC)


def run_list(args: argparse.Namespace) -> int:
    """``certs list``: a table (or ``--json``) of every pin."""
    reports = list_pins(load_trust_or_usage(args), now=_now(args))
    if args.json:
        _say(json.dumps({"certificates": [r.to_dict() for r in reports]}, indent=1))
        return EXIT_VERIFIED
    header = ("CLOUD", "ROLE", "SUBJECT", "ISSUER", "NOT AFTER", "DAYS", "STATUS", "CHAINS TO", "SHA-256", "SOURCE")
    rows = [header, *((r.cloud, r.role, r.subject, r.issuer, r.not_after.date().isoformat(), str(r.days_left),
                       r.status, r.chains_to or "-", r.sha256, r.source) for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        _say("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_VERIFIED


def run_check(args: argparse.Namespace) -> int:
    """``certs check``: exit 1 naming each problem, 0 when there is none."""
    trust = load_trust_or_usage(args)
    if args.warn_days < 0:
        raise UsageError("--warn-days must not be negative")
    report = check_pins(trust, now=_now(args), warn_days=args.warn_days, allow_retired=args.allow_retired)
    if args.json:
        _say(json.dumps({"ok": report.ok, "problems": [p.to_dict() for p in report.problems],
                         "retired": [p.to_dict() for p in report.notes]}, indent=1))
    else:
        for note in report.notes:
            _say(f"retired (allowed): {note.cloud}: {note.message}")
        for problem in report.problems:
            _say(str(problem))
        count = sum(1 for _ in trust.all_pins())
        _say(f"{count} pins checked: {len(report.problems)} problems, {len(report.notes)} retired pins allowed")
    return EXIT_VERIFIED if report.ok else EXIT_REFUSED


def _read_file(name: str) -> bytes:
    try:
        with Path(name).open("rb") as handle:
            data = handle.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {name}: {exc.strerror}") from exc
    if len(data) > MAX_PEM_BYTES:
        raise ConfigurationError(f"{name} is larger than {MAX_PEM_BYTES} bytes")
    return data


def run_add(args: argparse.Namespace) -> int:
    """``certs add``: pin the CA(s) of FILE for ``--cloud``; exit 1 and change nothing when refused."""
    directory = pinned_dir(args)
    load_trust_or_usage(args)
    try:
        changes = add_pins(directory, args.cloud, _read_file(args.file), origin=Path(args.file).name,
                           now=datetime.now(UTC), source=args.source)
    except ConfigurationError as exc:
        _complain(f"attest-service certs add: refused: {exc.message}")
        return EXIT_REFUSED
    for change in changes:
        _say(f"{change.action}: {change.cloud}: {change.subject} sha256 {change.sha256} ({change.file})")
    return EXIT_VERIFIED


def run_remove(args: argparse.Namespace) -> int:
    """``certs remove``: unpin one intermediate; exit 1 when nothing matches."""
    directory = pinned_dir(args)
    load_trust_or_usage(args)
    try:
        change = remove_pin(directory, args.cloud, args.pin)
    except ConfigurationError as exc:
        _complain(f"attest-service certs remove: {exc.message}")
        return EXIT_REFUSED
    _say(f"removed: {change.cloud}: {change.subject} sha256 {change.sha256} ({change.file})")
    return EXIT_VERIFIED


def run_explain(args: argparse.Namespace) -> int:
    """``certs explain``: which step a document fails; exit 0 when it verifies, 1 when it does not."""
    trust = load_trust_or_usage(args)
    try:
        with Path(args.file).open("rb") as handle:
            data = handle.read(MAX_DOCUMENT_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc
    explanation = explain_document(data, trust, cloud=args.cloud, now=_now(args))
    if args.json:
        _say(json.dumps(explanation.to_dict(), indent=1))
    elif explanation.verified:
        _say("verifies: every step passed")
    else:
        assert explanation.error is not None  # noqa: S101 - set whenever verified is false
        _say(f"fails at step {explanation.step}: {explanation.error['code']}: {explanation.error['message']}")
        if explanation.signer_issuer is not None:
            _say(f"signer: {explanation.signer_subject}")
            _say(f"signer's issuer: {explanation.signer_issuer}")
            _say(f"issuer's AIA caIssuers: {', '.join(explanation.ca_issuers) or 'none'}")
            pinned = "yes" if explanation.issuer_pinned else "no (pin it with certs add, after checking it)"
            _say(f"issuer pinned for {explanation.cloud}: {pinned}")
            _say(f"pins with that subject, any cloud: {'; '.join(explanation.issuer_pins) or 'none'}")
    return EXIT_VERIFIED if explanation.verified else EXIT_REFUSED


def register(subparsers: Subparsers) -> None:
    """Register ``certs`` and its sub-commands on the ``attest-service`` parser."""
    certs = subparsers.add_parser("certs", help="list, check, add and remove pinned certificates",
                                  description="Operate the pinned trust directory.")
    actions = certs.add_subparsers(dest="certs_command", required=True)

    listing = actions.add_parser("list", help="every pinned certificate")
    listing.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    listing.add_argument("--at", type=parse_instant, metavar="TIME", help="instant for status (default: now)")
    add_pinned_certs_option(listing)
    listing.set_defaults(handler=run_list)

    check = actions.add_parser("check", help="exit non-zero naming each problem of the pins")
    check.add_argument("--warn-days", type=int, default=DEFAULT_WARN_DAYS, metavar="D",
                       help=f"report pins expiring within D days (default {DEFAULT_WARN_DAYS})")
    check.add_argument("--allow-retired", action="store_true",
                       help="expired pins kept for verify --at are notes, not problems, if they still chain")
    check.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    check.add_argument("--at", type=parse_instant, metavar="TIME", help="instant to check at (default: now)")
    add_pinned_certs_option(check)
    check.set_defaults(handler=run_check)

    add = actions.add_parser("add", help="validate and pin an intermediate CA")
    add.add_argument("--cloud", choices=list(CLOUDS), required=True)
    add.add_argument("--source", help="provenance recorded in the manifest (default: file name and date)")
    add_pinned_certs_option(add)
    add.add_argument("file", metavar="FILE", help="PEM or DER certificate(s)")
    add.set_defaults(handler=run_add)

    remove = actions.add_parser("remove", help="unpin an intermediate")
    remove.add_argument("--cloud", choices=list(CLOUDS), required=True)
    add_pinned_certs_option(remove)
    remove.add_argument("pin", metavar="SHA256_OR_FILENAME")
    remove.set_defaults(handler=run_remove)

    explain = actions.add_parser("explain", help="which verification step a document fails, and why")
    explain.add_argument("--cloud", choices=[*CLOUDS, AUTO], default=AUTO)
    explain.add_argument("--at", type=parse_instant, metavar="TIME", help="instant to verify at (default: now)")
    explain.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    add_pinned_certs_option(explain)
    explain.add_argument("file", metavar="FILE")
    explain.set_defaults(handler=run_explain)
