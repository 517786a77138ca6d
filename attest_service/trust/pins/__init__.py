"""Operating the pinned trust: list, check, add and remove pins, as functions that return data.

The ``certs`` command (:mod:`attest_service.cli.certs`) only formats what these return, so the same checks
serve the CLI, the tests and a CI gate:

- :func:`list_pins`: every pinned certificate with its status and the root each intermediate chains to;
  :func:`list_fingerprint_pins`: the intermediates pinned by fingerprint only (awaiting a fetch).
- :func:`check_pins`: the problems an operator must act on (expired, expiring, unchained, not a CA,
  duplicate, certifi root missing, a file that is not loaded, a removed CA still pinned, a fingerprint pin
  the fallback cannot fetch, a line of ``removed.txt`` that is not a fingerprint, manifest out of sync).
  A pin whose manifest entry carries ``"retired"`` (why it is kept) is *retired*: an expired CA kept on
  purpose so that old documents can be verified at their own instant (``verify --at``). Its expiry is a
  note, not a problem, as long as it still chains to a root inside its own validity; an expired pin that
  is not marked so is a problem (an active pin the operator forgot to renew). See :data:`RetiredView`.
- :func:`add_pins` / :func:`add_fingerprint_pin` / :func:`add_from_document` / :func:`remove_pin`: change one
  cloud's intermediates atomically (temporary file and ``os.replace``) and keep ``manifest.json`` in step; a
  refused change leaves the directory untouched. :func:`remove_pin` records the removed fingerprint in
  ``intermediates/removed.txt``, so that a removed CA stays distrusted even where the fallback could fetch
  it again or its file comes back (loading leaves such a file out and :func:`check_pins` reports it).
  Adding the CA back (a file naming it restored or not) takes it off that list; add and remove are each
  other's inverse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.errors import AttestError, ConfigurationError, DocumentExpired, DocumentNotYetValid
from attest_service.trust.certificates import anchor_instant, ca_issuers_urls, ca_path, is_ca, is_self_signed
from attest_service.trust.issuers import (
    AiaPolicy,
    CertificateFetcher,
    FetchRefused,
    accept_issuing_ca,
    check_issued,
)
from attest_service.trust.loading import (
    CERTIFI_LIST,
    FINGERPRINT_LIST,
    MANIFEST,
    REMOVED_LIST,
    excluded_message,
    load_certificates,
    load_trust,
    loose_digests,
    manifest_entry,
    normalise_digest,
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

#: Default of ``check --warn-days``: a month leaves time to stage a successor pin (the contract's default).
DEFAULT_WARN_DAYS: Final = 30

_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")

Status = Literal["active", "expiring", "retired", "not_yet_valid"]
ProblemKind = Literal["expired", "expiring", "unchained", "not_ca", "duplicate", "certifi_missing", "manifest",
                      "not_loaded", "removed_pinned", "removed_list", "fingerprint", "awaiting_fetch"]
FingerprintStatus = Literal["awaiting_fetch", "fetched", "pinned"]
#: How ``certs check`` treats expired pins kept on purpose. ``marked`` (default): the pins the manifest marks
#: ``retired`` are notes, any other expired or expiring pin is a problem. ``strict``: every expired or expiring
#: pin is a problem, marked or not (the complete view). ``any``: every expired pin that still chains is a note,
#: marked or not (for a directory whose manifest marks nothing).
RetiredView = Literal["marked", "strict", "any"]
#: Key of a manifest entry that marks its pin retired; its value says why the pin is kept.
RETIRED_KEY: Final = "retired"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class FingerprintReport:
    """One intermediate pinned by fingerprint, as ``certs list`` shows it.

    ``awaiting_fetch``: its bytes are not in the directory; the service fetches it from ``url`` in the
    background (:mod:`attest_service.trust.fetched`), the AIA fallback (when on) from a document's caIssuers
    URL, accepting exactly this certificate; ``certs add --from-document`` pins it as a file.
    ``fetched``: the embedded store's cache directory holds its certificate, fetched by the service.
    ``pinned``: a pinned file has this fingerprint, so the line is redundant (and harmless).
    """

    cloud: str
    name: str
    algorithm: str
    digest: str
    url: str | None
    status: FingerprintStatus
    source: str

    def to_dict(self) -> dict[str, object]:
        """JSON form (``certs list --json``, under ``fingerprintPins``)."""
        return {"cloud": self.cloud, "name": self.name, "algorithm": self.algorithm, "digest": self.digest,
                "url": self.url, "status": self.status, "source": self.source}


def list_fingerprint_pins(trust: TrustStore, *,
                          fetched: Collection[tuple[str, str]] = ()) -> list[FingerprintReport]:
    """Every fingerprint pin of every cloud, with whether a pinned file already has its fingerprint.

    ``fetched`` holds the ``(cloud, digest)`` of the pins whose certificate the service fetched and keeps.
    """
    reports: list[FingerprintReport] = []
    for cloud_trust in trust.clouds.values():
        pinned = set().union(*(digests(pin.certificate) for pin in cloud_trust.intermediates))
        reports.extend(FingerprintReport(cloud=pin.cloud, name=pin.name, algorithm=pin.algorithm, digest=pin.digest,
                                         url=pin.url, status="pinned" if pin.digest in pinned else
                                         "fetched" if (pin.cloud, pin.digest) in fetched else "awaiting_fetch",
                                         source=pin.source)
                       for pin in cloud_trust.fingerprint_pins)
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
    """What ``certs check`` found: ``problems`` fail the check, the other two do not.

    ``notes`` are the expiry findings of retired pins (see :data:`RetiredView`); ``awaiting`` are fingerprint
    pins whose certificate is not in the directory yet.
    """

    problems: tuple[Problem, ...]
    notes: tuple[Problem, ...] = field(default=())
    awaiting: tuple[Problem, ...] = field(default=())

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


#: Key of ``manifest.json`` listing the fingerprint pins (cloud, file, algorithm, digest, url, name, source).
FINGERPRINTS_KEY: Final = "fingerprints"


def _read_manifest_document(directory: Path) -> dict[str, list[dict[str, str]]] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path}: expected a JSON object")
    lists: dict[str, list[dict[str, str]]] = {}
    for key in ("certificates", FINGERPRINTS_KEY):
        entries = document.get(key, [] if key == FINGERPRINTS_KEY else None)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(v, str) for v in e.values()) for e in entries):
            raise ConfigurationError(f"{path}: expected {{\"{key}\": [{{...}}, ...]}} with string fields")
        lists[key] = entries
    return lists


def read_manifest(directory: Path) -> list[dict[str, str]] | None:
    """The certificate entries of ``manifest.json``, or None when the directory has none.

    Raises ConfigurationError when the file exists but is not a manifest.
    """
    document = _read_manifest_document(directory)
    return None if document is None else document["certificates"]


def read_fingerprint_manifest(directory: Path) -> list[dict[str, str]] | None:
    """The fingerprint pin entries of ``manifest.json`` (``fingerprints``), or None without a manifest."""
    document = _read_manifest_document(directory)
    return None if document is None else document[FINGERPRINTS_KEY]


def fingerprint_manifest_entry(pin: FingerprintPin, source: str) -> dict[str, str]:
    """The manifest record of one fingerprint pin: where its fingerprint and URL were taken from."""
    return {"cloud": pin.cloud, "file": f"{pin.cloud}/intermediates/{FINGERPRINT_LIST}", "algorithm": pin.algorithm,
            "digest": pin.digest, "url": pin.url or "-", "name": pin.name, "source": source}


def _fingerprint_key(entry: dict[str, str]) -> tuple[str, str, str]:
    return (entry.get("cloud", ""), entry.get("digest", ""), entry.get("url", ""))


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
    present: set[tuple[str, str, str, str]] = set()
    for cloud_trust in trust.clouds.values():
        # A file left out for removed.txt is still a file: whether it has provenance is not the question
        # (the removed_pinned problem is), but a manifest entry naming it is not stale.
        present.update((pin.cloud, pin.role, _pin_file(pin), pin.sha256) for pin in cloud_trust.excluded)
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
    fingerprints = {_fingerprint_key(e) for e in read_fingerprint_manifest(trust.directory) or []}
    listed: set[tuple[str, str, str]] = set()
    for cloud_trust in trust.clouds.values():
        for fingerprint_pin in cloud_trust.fingerprint_pins:
            fingerprint_key = (fingerprint_pin.cloud, fingerprint_pin.digest, fingerprint_pin.url or "-")
            listed.add(fingerprint_key)
            if fingerprint_key not in fingerprints:
                found.append(Problem(kind="manifest", cloud=fingerprint_pin.cloud, subject=fingerprint_pin.name,
                                     sha256=fingerprint_pin.digest,
                                     message=f"fingerprint pin {fingerprint_pin.name} ({fingerprint_pin.source}, "
                                             f"{fingerprint_pin.algorithm} {fingerprint_pin.digest}) is not in "
                                             f"{MANIFEST}"))
    for cloud, digest, url in sorted(fingerprints - listed):
        found.append(Problem(kind="manifest", cloud=cloud, subject=FINGERPRINT_LIST, sha256=digest,
                             message=f"{MANIFEST} lists fingerprint pin {digest} ({url}), which is not in "
                                     f"{cloud}/intermediates/{FINGERPRINT_LIST}"))
    return found


def _fingerprint_problems(trust: CloudTrust, policy: AiaPolicy) -> tuple[list[Problem], list[Problem]]:
    """``(problems, awaiting)`` of the cloud's fingerprint pins."""
    problems: list[Problem] = []
    awaiting: list[Problem] = []
    pinned = set().union(*(digests(pin.certificate) for pin in trust.intermediates))
    for pin in trust.fingerprint_pins:
        name = f"fingerprint pin {pin.name} ({pin.source}, {pin.algorithm} {pin.digest})"

        def problem(kind: ProblemKind, message: str, into: list[Problem], pin: FingerprintPin = pin) -> None:
            into.append(Problem(kind=kind, cloud=pin.cloud, subject=pin.name, sha256=pin.digest, message=message))

        if pin.url is not None and not policy.allowed(pin.cloud, pin.url):
            problem("fingerprint", f"{name}: {pin.url} is not on the {pin.cloud} AIA allow-list, so it is never "
                                   "fetched", problems)
        elif pin.cloud not in policy.allow:
            problem("fingerprint", f"{name}: {pin.cloud} has no AIA allow-list, so it is never fetched", problems)
        if pin.digest in trust.removed:
            problem("removed_pinned", f"{name} is also listed in {REMOVED_LIST}, which wins: it is never accepted",
                    problems)
        elif pin.digest not in pinned:
            where = pin.url or "any allow-listed caIssuers URL"
            problem("awaiting_fetch", f"{name}: not in the directory yet; the AIA fallback takes it from {where}, "
                                      "or pin it with certs add --from-document", awaiting)
    return problems, awaiting


def retired_marks(directory: Path | None) -> dict[tuple[str, str], str]:
    """``(cloud, sha256) -> why it is kept`` of the pins the manifest of ``directory`` marks retired.

    A directory without a readable manifest marks nothing (the manifest problem is reported on its own).
    """
    if directory is None:
        return {}
    try:
        entries = read_manifest(directory) or []
    except ConfigurationError:
        return {}
    return {(e.get("cloud", ""), e.get("sha256", "")): e[RETIRED_KEY]
            for e in entries if e.get(RETIRED_KEY, "").strip()}


def check_pins(trust: TrustStore, *, now: datetime, warn_days: int = DEFAULT_WARN_DAYS,
               retired: RetiredView = "marked") -> CheckReport:
    """Every problem of the pinned trust at ``now``; ``retired`` says how expired pins count (:data:`RetiredView`)."""
    warn = timedelta(days=warn_days)
    problems: list[Problem] = []
    notes: list[Problem] = []
    awaiting: list[Problem] = []
    policy = AiaPolicy.azure()
    marks = retired_marks(trust.directory) if retired == "marked" else {}
    for cloud_trust in trust.clouds.values():
        cloud = cloud_trust.profile.name
        for pin in (*cloud_trust.roots, *cloud_trust.intermediates):
            reason = marks.get((pin.cloud, pin.sha256))
            # A retired pin's expiry needs no action; whether it still chains (in its own validity) does.
            noted = {"expired", "expiring"} if reason is not None else {"expired"} if retired == "any" else set()
            for found in _pin_problems(pin, cloud_trust, now, warn):
                if found.kind not in noted:
                    problems.append(found if found.kind != "expired" or retired == "strict" else dataclasses.replace(
                        found, message=f"{found.message}: pin its successor and remove it, or mark it "
                                       f"\"{RETIRED_KEY}\" in {MANIFEST} if it is kept to verify old documents"))
                elif reason is not None:
                    notes.append(dataclasses.replace(found, message=f"{found.message} (retired: {reason})"))
                else:
                    notes.append(found)
        problems.extend(Problem(kind="removed_pinned", cloud=cloud, subject=pin.subject_cn, sha256=pin.sha256,
                                message=excluded_message(pin)) for pin in cloud_trust.excluded)
        problems.extend(Problem(kind="removed_list", cloud=cloud, subject=message.partition(": ")[0], sha256="-",
                                message=message) for message in cloud_trust.removed_errors)
        problems.extend(_duplicates(cloud_trust))
        problems.extend(Problem(kind="certifi_missing", cloud=cloud, subject=CERTIFI_LIST,
                                sha256="-", message=message) for message in cloud_trust.problems)
        problems.extend(Problem(kind="not_loaded", cloud=cloud, subject=message.partition(":")[0], sha256="-",
                                message=message) for message in cloud_trust.ignored)
        fingerprint_problems, fingerprint_awaiting = _fingerprint_problems(cloud_trust, policy)
        problems.extend(fingerprint_problems)
        awaiting.extend(fingerprint_awaiting)
    problems.extend(_manifest_problems(trust))
    return CheckReport(problems=tuple(problems), notes=tuple(notes), awaiting=tuple(awaiting))


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
                    drop: Iterable[tuple[str, str, str, str]] = (),
                    add_fingerprints: Iterable[dict[str, str]] = (),
                    drop_fingerprints: Iterable[tuple[str, str, str]] = ()) -> None:
    document = _read_manifest_document(directory)
    if document is None:
        # First change to a directory without a manifest: record what is already there, saying honestly
        # that its origin is unknown, so that the manifest describes every pin from now on.
        unrecorded = "unrecorded (pinned before the manifest existed)"
        document = {"certificates": [manifest_entry(pin, unrecorded) | {"file": _pin_file(pin)}
                                     for pin in trust.all_pins()],
                    FINGERPRINTS_KEY: [fingerprint_manifest_entry(pin, unrecorded) for cloud in trust.clouds.values()
                                       for pin in cloud.fingerprint_pins]}
    dropped = set(drop)
    dropped_fingerprints = set(drop_fingerprints)
    updated: dict[str, object] = {
        "certificates": [*(e for e in document["certificates"] if _manifest_key(e) not in dropped), *add]}
    fingerprints = [*(e for e in document[FINGERPRINTS_KEY] if _fingerprint_key(e) not in dropped_fingerprints),
                    *add_fingerprints]
    if fingerprints:
        updated[FINGERPRINTS_KEY] = fingerprints
    _atomic_write(directory / MANIFEST, (json.dumps(updated, indent=1, ensure_ascii=False) + "\n").encode())


def _rewrite_list(path: Path, *, keep: Callable[[str], bool] = lambda _digest: True,
                  append: Sequence[str] = (), header: str = "") -> None:
    """Rewrite a fingerprint list file without the lines whose digest ``keep`` rejects, plus ``append``.

    Comments and blank lines stay as they are; a file left with no entry and no comment is deleted.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else ([header] if header else [])
    kept = []
    for line in lines:
        text = line.partition("#")[0].strip()
        parsed = normalise_digest(text.split()[0]) if text else None
        if parsed is None or keep(parsed[1]):
            kept.append(line)
    kept.extend(append)
    if any(line.partition("#")[0].strip() for line in kept):
        _atomic_write(path, ("\n".join(kept) + "\n").encode())
    elif path.is_file():
        path.unlink()


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
        _rewrite_list(path, keep=lambda digest: digest not in wanted)


def _record_removed(directory: Path, cloud: str, entries: Sequence[tuple[str, str]], now: datetime) -> None:
    """Add ``(digest, description)`` entries to the cloud's removed list."""
    path = directory / cloud / "intermediates" / REMOVED_LIST
    already = load_trust(directory).for_cloud(cloud).removed
    lines = [f"{digest}  # {description}, removed on {now.date().isoformat()}"
             for digest, description in entries if digest not in already]
    if lines:
        _rewrite_list(path, append=lines, header=_REMOVED_HEADER)


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
    recorded = {_manifest_key(e) for e in read_manifest(directory) or []}
    changes: list[PinChange] = []
    entries: list[dict[str, str]] = []
    written: list[tuple[Path, x509.Certificate]] = []
    for certificate in certificates:
        digest = fingerprint(certificate)
        if digest in pinned:
            changes.append(PinChange(cloud=cloud, file=_pin_file(pinned[digest]), subject=pinned[digest].subject_cn,
                                     sha256=digest, action="already_pinned"))
            continue
        pin = restored.get(digest)
        if pin is None:
            relative = f"{cloud}/intermediates/{pin_filename(certificate)}"
            pin = PinnedCertificate(cloud=cloud, role="intermediate", certificate=certificate,
                                    source=f"file:{relative}")
            written.append((directory / relative, certificate))
        if (cloud, "intermediate", _pin_file(pin), digest) not in recorded:
            entries.append(manifest_entry(pin, source or f"certs add {origin} on {now.date().isoformat()}"))
        changes.append(PinChange(cloud=cloud, file=_pin_file(pin), subject=pin.subject_cn, sha256=digest,
                                 action="added"))
    for path, certificate in written:
        _atomic_write(path, certificate.public_bytes(serialization.Encoding.PEM))
    # An operator pinning a CA again means it: it comes off the removed list the AIA fallback honours.
    _forget_removed(directory, cloud, set().union(*(digests(c) for c in certificates)))
    if entries:
        _write_manifest(trust, directory, add=entries)
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
    _rewrite_list(directory / relative, append=[f"{value}  {url or '-'}  # {label}"], header=_FINGERPRINT_HEADER)
    _forget_removed(directory, cloud, {value})
    _write_manifest(trust, directory, add_fingerprints=[fingerprint_manifest_entry(
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
                   pin.path is not None and which.strip() in (pin.path.name, _pin_file(pin)))]
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
            _atomic_write(path, b"".join(p.certificate.public_bytes(serialization.Encoding.PEM) for p in siblings))
        else:
            path.unlink()
    if by_fingerprint:
        _rewrite_list(directory / cloud / "intermediates" / FINGERPRINT_LIST, keep=lambda digest: digest != wanted)
    _write_manifest(trust, directory, drop=[(cloud, "intermediate", _pin_file(p), p.sha256) for p in matches],
                    drop_fingerprints=[(cloud, p.digest, p.url or "-") for p in by_fingerprint])
    if not matches:
        first = by_fingerprint[0]
        return PinChange(cloud=cloud, file=f"{cloud}/intermediates/{FINGERPRINT_LIST}", subject=first.name,
                         sha256=first.digest, action="removed")
    first_pin = matches[0]
    return PinChange(cloud=cloud, file=_pin_file(first_pin), subject=", ".join(p.subject_cn for p in matches),
                     sha256=", ".join(p.sha256 for p in matches), action="removed")
