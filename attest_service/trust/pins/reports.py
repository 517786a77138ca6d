"""What ``certs list`` and ``certs check`` report: every pin with its status, and the problems to act on.

A pin whose manifest entry carries ``"retired"`` (why it is kept) is *retired*: an expired CA kept on purpose
so that old documents can be verified at their own instant (``verify --at``). Its expiry is a note, not a
problem, as long as it still chains to a root inside its own validity (see :data:`RetiredView`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from attest_service.errors import AttestError, ConfigurationError
from attest_service.trust.certificates import anchor_instant, ca_path, is_ca
from attest_service.trust.issuers import (
    AiaPolicy,
)
from attest_service.trust.loading import (
    CERTIFI_LIST,
    FINGERPRINT_LIST,
    MANIFEST,
    REMOVED_LIST,
    excluded_message,
)
from attest_service.trust.pins.manifest import (
    RETIRED_KEY,
    fingerprint_entry_key,
    manifest_key,
    pin_file,
    read_fingerprint_manifest,
    read_manifest,
    retired_marks,
)
from attest_service.verify import (
    CloudTrust,
    FingerprintPin,
    PinnedCertificate,
    TrustStore,
    common_name,
    digests,
)

#: Default of ``check --warn-days``: a month leaves time to stage a successor pin (the contract's default).
DEFAULT_WARN_DAYS: Final = 30


Status = Literal["active", "expiring", "retired", "not_yet_valid"]


ProblemKind = Literal["expired", "expiring", "unchained", "not_ca", "duplicate", "certifi_missing", "manifest",
                      "not_loaded", "removed_pinned", "removed_list", "fingerprint", "awaiting_fetch"]


FingerprintStatus = Literal["awaiting_fetch", "fetched", "pinned"]


#: How ``certs check`` treats expired pins kept on purpose. ``marked`` (default): the pins the manifest marks
#: ``retired`` are notes, any other expired or expiring pin is a problem. ``strict``: every expired or expiring
#: pin is a problem, marked or not (the complete view). ``any``: every expired pin that still chains is a note,
#: marked or not (for a directory whose manifest marks nothing).
RetiredView = Literal["marked", "strict", "any"]


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


def _manifest_problems(trust: TrustStore) -> list[Problem]:
    assert trust.directory is not None  # noqa: S101 - a loaded TrustStore always knows its directory
    try:
        entries = read_manifest(trust.directory)
    except ConfigurationError as exc:
        return [Problem(kind="manifest", cloud="-", subject=MANIFEST, sha256="-", message=exc.message)]
    if entries is None:
        return [Problem(kind="manifest", cloud="-", subject=MANIFEST, sha256="-",
                        message=f"{MANIFEST} is missing: pins have no recorded provenance")]
    recorded = {manifest_key(e) for e in entries}
    found = []
    present: set[tuple[str, str, str, str]] = set()
    for cloud_trust in trust.clouds.values():
        # A file left out for removed.txt is still a file: whether it has provenance is not the question
        # (the removed_pinned problem is), but a manifest entry naming it is not stale.
        present.update((pin.cloud, pin.role, pin_file(pin), pin.sha256) for pin in cloud_trust.excluded)
    for pin in trust.all_pins():
        key = (pin.cloud, pin.role, pin_file(pin), pin.sha256)
        present.add(key)
        if key not in recorded:
            found.append(Problem(kind="manifest", cloud=pin.cloud, subject=pin.subject_cn, sha256=pin.sha256,
                                 message=f"{pin_file(pin)} ({pin.subject_cn}, sha256 {pin.sha256}) is not "
                                         f"in {MANIFEST}"))
    for cloud, role, file, sha256 in sorted(recorded - present):
        found.append(Problem(kind="manifest", cloud=cloud, subject=file, sha256=sha256,
                             message=f"{MANIFEST} lists {role} {file} (sha256 {sha256}), which is not pinned"))
    fingerprints = {fingerprint_entry_key(e) for e in read_fingerprint_manifest(trust.directory) or []}
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
            how = (f"the service fetches it in the background from {pin.url}" if pin.url is not None else
                   "the service fetches it in the background from the allow-listed caIssuers URL of the first "
                   "document it refuses for want of it")
            problem("awaiting_fetch", f"{name}: not in the directory yet; {how}, or pin it with certs add "
                                      "--from-document", awaiting)
    return problems, awaiting


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
