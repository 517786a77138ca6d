"""The ``certs`` command: list, check, add, remove and explain pins; it formats what `attest_service.trust` returns."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attest_service.cli import crls
from attest_service.cli.common import (
    EXIT_REFUSED,
    EXIT_VERIFIED,
    UsageError,
    add_pinned_certs_option,
    load_trust_or_usage,
    parse_instant,
    pinned_dir,
)
from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import ConfigurationError
from attest_service.nonces import default_sqlite_url
from attest_service.trust import MAX_PEM_BYTES
from attest_service.trust.crls import check_crls
from attest_service.trust.explain import explain_document
from attest_service.trust.fetched import cache_dir_for_store, cached_states
from attest_service.trust.pins import (
    DEFAULT_WARN_DAYS,
    PinChange,
    add_fingerprint_pin,
    add_from_document,
    add_pins,
    check_pins,
    list_fingerprint_pins,
    list_pins,
    remove_pin,
)

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

#: Largest accepted document for ``explain``, in bytes (an IMDS response is about 8 KiB).
MAX_DOCUMENT_BYTES: Final = 256 * 1024


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _complain(text: str) -> None:
    sys.stderr.write(text + "\n")


def _now(args: argparse.Namespace) -> datetime:
    at: datetime | None = getattr(args, "at", None)
    return at if at is not None else datetime.now(UTC)


def run_list(args: argparse.Namespace) -> int:
    """``certs list``: a table (or ``--json``) of every pin.

    A fingerprint pin shows ``fetched`` when the service fetched its certificate and keeps it beside the
    embedded store (``ATTEST_NONCE_STORE``'s SQLite file); with Redis the service's metrics say so instead.
    """
    trust = load_trust_or_usage(args)
    reports = list_pins(trust, now=_now(args))
    # What the service fetched is kept beside the embedded store's SQLite file (the same variable says where).
    store = os.environ.get("ATTEST_NONCE_STORE") or default_sqlite_url()
    held = {(f.pin.cloud, f.pin.digest) for f in cached_states(trust, cache_dir_for_store(store))
            if f.state == "fetched"}
    fingerprints = list_fingerprint_pins(trust, fetched=held)
    if args.json:
        _say(json.dumps({"certificates": [r.to_dict() for r in reports],
                         "fingerprintPins": [f.to_dict() for f in fingerprints]}, indent=1))
        return EXIT_VERIFIED
    header = ("CLOUD", "ROLE", "SUBJECT", "ISSUER", "NOT AFTER", "DAYS", "STATUS", "CHAINS TO", "SHA-256", "SOURCE")
    rows = [header, *((r.cloud, r.role, r.subject, r.issuer, r.not_after.date().isoformat(), str(r.days_left),
                       r.status, r.chains_to or "-", r.sha256, r.source) for r in reports)]
    # Pinned by fingerprint only: nothing but the digest is known until the certificate is fetched.
    rows += [(f.cloud, "intermediate", f.name, "-", "-", "-", f.status, "-",
              f.digest if f.algorithm == "sha256" else f"sha1:{f.digest}", f"{f.source} {f.url or '(any allowed URL)'}")
             for f in fingerprints]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        _say("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_VERIFIED


def run_check(args: argparse.Namespace) -> int:
    """``certs check``: exit 1 naming each problem, 0 when there is none.

    Pins the manifest marks retired (expired CAs kept for ``verify --at``) are reported as retired and do not
    fail the check unless ``--strict``; every other expired or expiring pin does.
    """
    trust = load_trust_or_usage(args)
    if args.warn_days < 0:
        raise UsageError("--warn-days must not be negative")
    report = check_pins(trust, now=_now(args), warn_days=args.warn_days, retired=args.retired)
    # A CRL that is not used (forged, malformed, foreign) fails the check; a stale one only warns.
    crls = check_crls(trust, now=_now(args))
    ok = report.ok and not crls.problems
    if args.json:
        _say(json.dumps({"ok": ok, "problems": [p.to_dict() for p in report.problems],
                         "retired": [p.to_dict() for p in report.notes],
                         "awaitingFetch": [p.to_dict() for p in report.awaiting],
                         "crlProblems": list(crls.problems), "crlWarnings": list(crls.warnings)}, indent=1))
    else:
        for note in report.notes:
            _say(f"retired: {note.cloud}: {note.message}")
        for waiting in report.awaiting:
            _say(f"awaiting fetch: {waiting.cloud}: {waiting.message}")
        for problem in report.problems:
            _say(str(problem))
        for message in crls.problems:
            _say(f"problem: crl: {message}")
        for message in crls.warnings:
            _say(f"warning: crl: {message}")
        count = sum(1 for _ in trust.all_pins())
        _say(f"{count} pins checked: {len(report.problems)} problems, {len(report.notes)} retired, "
             f"{len(report.awaiting)} fingerprint pins awaiting fetch")
        in_use = sum(len(cloud.crls) for cloud in trust.clouds.values())
        _say(f"{in_use} CRLs in use: {len(crls.problems)} files not used, {len(crls.warnings)} warnings")
    return EXIT_VERIFIED if ok else EXIT_REFUSED


def _read_file(name: str, *, limit: int = MAX_PEM_BYTES) -> bytes:
    try:
        with Path(name).open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {name}: {exc.strerror}") from exc
    if len(data) > limit:
        raise ConfigurationError(f"{name} is larger than {limit} bytes")
    return data


def _check_add_arguments(args: argparse.Namespace) -> None:
    sources = [name for name, value in (("FILE", args.file), ("--fingerprint", args.fingerprint),
                                        ("--from-document", args.from_document)) if value is not None]
    if len(sources) != 1:
        raise UsageError("give exactly one of FILE, --fingerprint or --from-document"
                         + (f" (got {', '.join(sources)})" if sources else ""))
    if args.issuer is not None and args.from_document is None:
        raise UsageError("--issuer goes with --from-document")
    if (args.url is not None or args.name is not None) and args.fingerprint is None:
        raise UsageError("--url and --name go with --fingerprint")


def _say_changes(changes: tuple[PinChange, ...] | list[PinChange]) -> None:
    for change in changes:
        _say(f"{change.action}: {change.cloud}: {change.subject} sha256 {change.sha256} ({change.file})")


def run_add(args: argparse.Namespace) -> int:
    """``certs add``: pin the CA(s) of FILE, a fingerprint, or a document's issuer for ``--cloud``.

    Exit 1 and change nothing when refused.
    """
    _check_add_arguments(args)
    directory = pinned_dir(args)
    load_trust_or_usage(args)
    now = datetime.now(UTC)
    try:
        if args.fingerprint is not None:
            change = add_fingerprint_pin(directory, args.cloud, args.fingerprint, url=args.url,
                                         name=args.name or "", now=now, source=args.source)
            _say(f"{change.action}: {change.cloud}: fingerprint pin {change.subject} {change.sha256} "
                 f"({change.file}; fetched from {args.url or 'any allowed caIssuers URL'})")
            return EXIT_VERIFIED
        if args.from_document is not None:
            document = _read_file(args.from_document, limit=MAX_DOCUMENT_BYTES)
            issuer = None if args.issuer is None else _read_file(args.issuer)
            pinned = add_from_document(directory, args.cloud, document, now=now, issuer=issuer,
                                       issuer_origin=Path(args.issuer).name if args.issuer else "issuer file",
                                       source=args.source)
            _say(f"issuer of the document's signer: {pinned.issuer}, from {pinned.origin}")
            for other in pinned.ignored:
                _complain(f"note: {other} in {pinned.origin} is not the signer's issuer: not pinned")
            _say_changes(pinned.changes)
            return EXIT_VERIFIED
        _say_changes(add_pins(directory, args.cloud, _read_file(args.file), origin=Path(args.file).name, now=now,
                              source=args.source))
    except ConfigurationError as exc:
        _complain(f"attest-service certs add: refused: {exc.message}")
        return EXIT_REFUSED
    return EXIT_VERIFIED


def run_remove(args: argparse.Namespace) -> int:
    """``certs remove``: unpin one intermediate; exit 1 when nothing matches."""
    directory = pinned_dir(args)
    load_trust_or_usage(args)
    try:
        change = remove_pin(directory, args.cloud, args.pin, now=datetime.now(UTC))
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

    check = actions.add_parser(
        "check", help="exit non-zero naming each problem of the pins",
        description="Audit the pinned directory: exit 1, naming each certificate, when a pin is expired or expires "
                    "within --warn-days, when an intermediate does not chain to a root of its cloud, or when an "
                    "intermediate is not a CA; exit 0 when every pin is sound, 2 on a usage error.")
    check.add_argument("--warn-days", type=int, default=DEFAULT_WARN_DAYS, metavar="D",
                       help=f"report pins expiring within D days (default {DEFAULT_WARN_DAYS})")
    view = check.add_mutually_exclusive_group()
    view.add_argument("--strict", dest="retired", action="store_const", const="strict", default="marked",
                      help="report retired pins (marked \"retired\" in manifest.json) as problems too")
    view.add_argument("--allow-retired", dest="retired", action="store_const", const="any",
                      help="treat every expired pin that still chains as retired, marked or not")
    check.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    check.add_argument("--at", type=parse_instant, metavar="TIME", help="instant to check at (default: now)")
    add_pinned_certs_option(check)
    check.set_defaults(handler=run_check)

    add = actions.add_parser("add", help="validate and pin an intermediate CA",
                             description="Pin the CA(s) of FILE; or an intermediate by fingerprint (--fingerprint); "
                                         "or the issuer of a document's signer (--from-document).")
    add.add_argument("--cloud", choices=list(CLOUDS), required=True, help="the cloud whose roots the CA must chain to")
    add.add_argument("--source", help="provenance recorded in the manifest (default: what was added and the date)")
    add_pinned_certs_option(add)
    add.add_argument("file", metavar="FILE", nargs="?", help="PEM or DER certificate(s)")
    add.add_argument("--fingerprint", metavar="HEX",
                     help="pin by SHA-256 (or SHA-1) fingerprint; the AIA fallback fetches exactly that certificate")
    add.add_argument("--url", help="with --fingerprint: the allow-listed URL to fetch it from (default: any "
                                   "allow-listed caIssuers URL the signer names)")
    add.add_argument("--name", help="with --fingerprint: the CA's name, for listings")
    add.add_argument("--from-document", metavar="DOC",
                     help="pin the issuer of this document's signer (IMDS response, base64 or DER), fetched from "
                          "its caIssuers URL under the AIA fallback's rules, or taken from --issuer")
    add.add_argument("--issuer", metavar="FILE", help="with --from-document: a file holding the issuer's certificate "
                                                    "(only the certificate that issued the signer is pinned)")
    add.set_defaults(handler=run_add)

    remove = actions.add_parser("remove", help="unpin an intermediate",
                                description="Unpin one intermediate of a cloud, named by its SHA-256 or its file name.")
    remove.add_argument("--cloud", choices=list(CLOUDS), required=True, help="the cloud whose pin is removed")
    add_pinned_certs_option(remove)
    remove.add_argument("pin", metavar="SHA256_OR_FILENAME",
                        help="the pin's SHA-256 fingerprint (as certs list prints it) or its file name")
    remove.set_defaults(handler=run_remove)

    crls.register(actions)

    explain = actions.add_parser(
        "explain", help="which verification step a document fails, and why",
        description="Walk one document through the verification steps against the pinned trust and say, in "
                    "words, which step it fails and what would let it pass (a missing pin, an instant outside "
                    "a certificate's validity, ...); exit 0 when it verifies, 1 when it does not, 2 on a usage "
                    "error.")
    explain.add_argument("--cloud", choices=[*CLOUDS, AUTO], default=AUTO,
                         help="cloud whose trust and domain apply (default: auto, from the signer's name)")
    explain.add_argument("--at", type=parse_instant, metavar="TIME", help="instant to verify at (default: now)")
    explain.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    add_pinned_certs_option(explain)
    explain.add_argument("file", metavar="FILE",
                         help="the document: IMDS response JSON, bare base64 signature or DER")
    explain.set_defaults(handler=run_explain)
