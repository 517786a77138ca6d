"""``certs crls list|fetch``: the CRLs of the trust directory, and downloading them from the allow-listed hosts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attest_service.cli.common import (
    EXIT_REFUSED,
    EXIT_VERIFIED,
    UsageError,
    add_pinned_certs_option,
    load_trust_or_usage,
    pinned_dir,
)
from attest_service.errors import AttestError, ConfigurationError
from attest_service.trust import load_trust
from attest_service.trust.crl_fetch import CrlFetcher, FetchReport, wanted_crls
from attest_service.trust.crls import crl_statuses
from attest_service.verify import decode

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

#: Largest document read for ``--document``, in bytes (an IMDS response is about 8 KiB).
MAX_DOCUMENT_BYTES: Final = 256 * 1024
#: Shortest interval of ``--every``, in seconds: CRLs are published hours apart.
MIN_EVERY_SECONDS: Final = 60.0
#: How often ``--parent-pid`` looks whether the parent is still there, in seconds.
PARENT_CHECK_SECONDS: Final = 1.0


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_list(args: argparse.Namespace) -> int:
    """``certs crls list``: every CRL in use, and every file of the ``crls/`` folders not used."""
    trust = load_trust_or_usage(args)
    statuses = crl_statuses(trust)
    problems = [problem for cloud in trust.clouds.values() for problem in cloud.crl_problems]
    if args.json:
        _say(json.dumps({"crls": [status.to_dict() for status in statuses], "notUsed": problems}, indent=1))
        return EXIT_VERIFIED
    for status in statuses:
        _say(f"{status.cloud}  {status.issuer}  thisUpdate {status.this_update.isoformat()}  nextUpdate "
             f"{status.next_update.isoformat()}  {status.entries} entries  {status.source}")
    for problem in problems:
        _say(f"not used: {problem}")
    _say(f"{len(statuses)} CRLs in use, {len(problems)} files not used")
    return EXIT_VERIFIED


def _documents(names: list[str]) -> list[bytes]:
    documents = []
    for name in names:
        try:
            with Path(name).open("rb") as handle:
                data = handle.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror}") from exc
        try:
            documents.append(decode(data))
        except AttestError as exc:
            raise UsageError(f"{name}: {exc.message}") from exc
    return documents


def _report(report: FetchReport, *, as_json: bool) -> None:
    if as_json:
        _say(json.dumps({"outcomes": [outcome.to_dict() for outcome in report.outcomes],
                         "missing": [{"cloud": item.cloud, "urls": list(item.urls), "reason": item.reason}
                                     for item in report.missing]}, indent=1))
        return
    for outcome in report.outcomes:
        where = f" -> {outcome.file}" if outcome.file else ""
        _say(f"{outcome.result}: {outcome.cloud}: {outcome.url}{where}: {outcome.message}")
    for item in report.missing:
        _say(f"missing: {item.cloud}: the CRL {item.reason} ({', '.join(item.urls)}) could not be fetched")


def fetch_round(directory: Path, documents: list[bytes], fetcher: CrlFetcher) -> FetchReport:
    """One round: load the directory, fetch every wanted CRL into it; raises ConfigurationError."""
    trust = load_trust(directory)
    return fetcher.fetch(directory, trust, wanted_crls(trust, directory, documents))


def run_fetch(args: argparse.Namespace) -> int:
    """``certs crls fetch``: exit 0 when every wanted CRL is in the directory (written or already current)."""
    directory = pinned_dir(args)
    load_trust_or_usage(args)
    documents = _documents(args.document)
    if args.every is not None and args.every < MIN_EVERY_SECONDS:
        raise UsageError(f"--every must be at least {MIN_EVERY_SECONDS:g} seconds")
    fetcher = CrlFetcher()
    while True:
        started = time.monotonic()
        try:
            report = fetch_round(directory, documents, fetcher)
        except ConfigurationError as exc:
            sys.stderr.write(f"attest-service certs crls fetch: {exc.message}\n")
            if args.every is None:
                return EXIT_REFUSED
        else:
            _report(report, as_json=args.json)
            if args.every is None:
                return EXIT_REFUSED if report.missing else EXIT_VERIFIED
        _say(f"{datetime.now(UTC).isoformat()}: next round in {args.every:g} s")
        while (remaining := args.every - (time.monotonic() - started)) > 0:
            if args.parent_pid is not None and os.getppid() != args.parent_pid:
                # The service that started this fetch is gone (even killed): an orphan must not go on fetching.
                _say("the process that started this fetch has exited: stopping")
                return EXIT_VERIFIED
            time.sleep(min(PARENT_CHECK_SECONDS, remaining))


def register(actions: Subparsers) -> None:
    """Add ``certs crls list`` and ``certs crls fetch`` to the ``certs`` sub-commands."""
    crls = actions.add_parser("crls", help="the CRLs of the trust directory: list them, fetch them",
                              description="CRLs live in <cloud>/crls/ of the trust directory (see README, "
                                          "Revocation).")
    commands = crls.add_subparsers(dest="crls_command", required=True)
    listing = commands.add_parser("list", help="every CRL in use, and the files of crls/ that are not used")
    listing.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    add_pinned_certs_option(listing)
    listing.set_defaults(handler=run_list)
    fetch = commands.add_parser(
        "fetch", help="download the CRLs the pinned CAs and given documents' signers name",
        description="Download, from the allow-listed Microsoft and DigiCert CRL hosts only, the CRLs that the "
                    "pinned CAs, the signers of the given documents and earlier fetches name; keep each only "
                    "when its signature verifies under the pinned CA it names; write it atomically into "
                    "<cloud>/crls/. Exit 0 when every wanted CRL is in place, 1 otherwise, 2 on a usage error.")
    fetch.add_argument("--document", action="append", default=[], metavar="FILE",
                       help="an attested document (IMDS response, base64 or DER) whose signer's CRL to fetch "
                            "(its issuing CA's, which no pin names); may be repeated")
    fetch.add_argument("--every", type=float, metavar="SECONDS",
                       help=f"keep running, fetching again every SECONDS (at least {MIN_EVERY_SECONDS:g})")
    fetch.add_argument("--parent-pid", type=int, metavar="PID",
                       help="with --every: stop once this process is no longer the parent (serve's refresher stops "
                            "with the service, however the service ends)")
    fetch.add_argument("--json", action="store_true", help="one JSON object per round instead of lines")
    add_pinned_certs_option(fetch)
    fetch.set_defaults(handler=run_fetch)
