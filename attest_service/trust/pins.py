"""Operating the pinned trust: list, check, add and remove pins, as functions that return data.

The ``certs`` command (:mod:`attest_service.cli.certs`) only formats what these return, so the same checks
serve the CLI, the tests and a CI gate:

- :func:`list_pins`: every pinned certificate with its status and the root each intermediate chains to.
- :func:`check_pins`: the problems an operator must act on (expired, expiring, unchained, not a CA,
  duplicate, certifi root missing, manifest out of sync). Expired pins are *retired*: they are kept on
  purpose so old documents can be verified at their own instant (``verify --at``), so ``allow_retired``
  turns them into notes, as long as each still chains to a root inside its own validity.
- :func:`add_pins` / :func:`remove_pin`: change one cloud's intermediates atomically (temporary file and
  ``os.replace``) and keep ``manifest.json`` in step; a refused change leaves the directory untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.errors import AttestError, ConfigurationError
from attest_service.trust.certificates import anchor_instant, ca_path, is_ca, is_self_signed
from attest_service.trust.loading import CERTIFI_LIST, MANIFEST, load_certificates, load_trust, manifest_entry
from attest_service.verify import CloudTrust, PinnedCertificate, TrustStore, common_name, fingerprint

#: Default of ``check --warn-days``: a month leaves time to stage a successor pin (the contract's default).
DEFAULT_WARN_DAYS: Final = 30

_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")

Status = Literal["active", "expiring", "retired", "not_yet_valid"]
ProblemKind = Literal["expired", "expiring", "unchained", "not_ca", "duplicate", "certifi_missing", "manifest"]


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
        path = ca_path(pin.certificate, trust, anchor_instant(pin.certificate, now))
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
        instant = anchor_instant(pin.certificate, now)
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
