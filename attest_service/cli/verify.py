"""The ``verify`` command: one document, offline, one JSON object on standard output (the contract's exit codes)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from attest_service.cli.common import (
    EXIT_REFUSED,
    EXIT_VERIFIED,
    UsageError,
    add_pinned_certs_option,
    load_trust_or_usage,
    parse_instant,
)
from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import AttestError
from attest_service.verify import (
    DEFAULT_REVOCATION,
    MAX_SIGNATURE_CHARS,
    REVOCATION_MODES,
    DocumentVerifier,
    VerificationPolicy,
    decode,
    revocation_mode,
)

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers


def _emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")


def _read_input(source: str) -> bytes:
    limit = MAX_SIGNATURE_CHARS * 2 + 1
    try:
        if source == "-":
            return sys.stdin.buffer.read(limit)
        with Path(source).open("rb") as handle:
            return handle.read(limit)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from exc


def run_verify(args: argparse.Namespace) -> int:
    """``verify``: one document, offline; one JSON object on standard output."""
    trust = load_trust_or_usage(args)
    data = _read_input(args.file)
    now = args.at if args.at is not None else datetime.now(UTC)
    policy = VerificationPolicy(cloud=args.cloud, expected_nonce=args.nonce,
                                revocation=revocation_mode(args.revocation, origin="--revocation"))
    try:
        result = DocumentVerifier(trust).verify(decode(data), policy=policy, at=now)
    except AttestError as exc:
        _emit({"verified": False, "error": exc.to_dict()})
        return EXIT_REFUSED
    payload = result.to_dict()
    # The shape of the service's answer: offline there is no challenge to consume.
    payload["nonce"] = {"value": result.claims.nonce, "checked": args.nonce is not None, "challenge": False}
    _emit(payload)
    return EXIT_VERIFIED


def register(subparsers: Subparsers) -> None:
    """Add the ``verify`` sub-command."""
    parser = subparsers.add_parser(
        "verify", help="verify one attested document offline",
        description="Verify one attested document against the pinned trust; print one JSON object: "
                    '{"verified": true, "cloud", "claims", "signer", "nonce"} or {"verified": false, "error": '
                    '{"code", "message"}}.',
        epilog="exit codes: 0 verified, 1 refused (the error's code says why), 2 usage error (an unreadable file "
               "or pinned directory, a bad option).")
    parser.add_argument("--cloud", choices=[*CLOUDS, AUTO], default=AUTO,
                        help="cloud whose trust and domain apply (default: auto, from the signer's name)")
    parser.add_argument("--nonce", help="expected nonce; without it the nonce is reported, not checked")
    parser.add_argument("--at", type=parse_instant, metavar="TIME",
                        help="ISO 8601 instant to verify at (default: now)")
    parser.add_argument("--revocation", choices=REVOCATION_MODES, default=DEFAULT_REVOCATION,
                        help="CRLs of the pinned directory: soft (default) refuses a listed certificate and "
                             "accepts one no current CRL covers; hard refuses that too; off ignores CRLs")
    add_pinned_certs_option(parser)
    parser.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                        help="IMDS response JSON or bare base64 signature (default: standard input)")
    parser.set_defaults(handler=run_verify)


