"""The ``attest-service`` command line: one sub-command per edge, each a thin call into the core.

Sub-commands register themselves through a ``register(subparsers)`` function in their module, set
``handler`` to a function taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attest_service import __version__
from attest_service.clouds import AUTO, CLOUDS
from attest_service.config import Settings
from attest_service.errors import AttestError, ConfigurationError
from attest_service.trust import TrustStore, load_trust
from attest_service.verify import VerificationPolicy, Verifier, decode_document
from attest_service.verify.document import MAX_SIGNATURE_CHARS

#: Exit codes of ``verify`` (the contract): 0 verified, 1 refused, 2 usage.
EXIT_VERIFIED: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2

if TYPE_CHECKING:
    # argparse exposes no public name for the object add_subparsers() returns.
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line argument is unusable; reported on standard error with exit code 2."""


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant for ``--at``; a value without offset is taken as UTC."""
    try:
        instant = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 instant") from None
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def pinned_dir(args: argparse.Namespace) -> Path:
    """The pinned directory: ``--pinned-certs``, else ``ATTEST_PINNED_CERTS``, else the bundled one."""
    explicit: Path | None = getattr(args, "pinned_certs", None)
    return explicit if explicit is not None else Settings.from_env().pinned_certs


def load_trust_or_usage(args: argparse.Namespace) -> TrustStore:
    """Load the trust for a command; an unusable directory is a usage error."""
    try:
        return load_trust(pinned_dir(args))
    except ConfigurationError as exc:
        raise UsageError(exc.message) from exc


def add_pinned_certs_option(parser: argparse.ArgumentParser) -> None:
    """The ``--pinned-certs DIR`` option shared by every command that reads trust."""
    parser.add_argument("--pinned-certs", type=Path, metavar="DIR",
                        help="pinned trust directory (default: $ATTEST_PINNED_CERTS or the bundled pins)")


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
    policy = VerificationPolicy(cloud=args.cloud, expected_nonce=args.nonce)
    try:
        result = Verifier(trust).verify(decode_document(data), policy=policy, now=now)
    except AttestError as exc:
        _emit({"verified": False, "error": exc.to_dict()})
        return EXIT_REFUSED
    payload = result.to_dict()
    if args.nonce is None:
        payload["nonceChecked"] = False
    _emit(payload)
    return EXIT_VERIFIED


def _register_verify(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("verify", help="verify one attested document offline",
                                   description="Verify one attested document; print one JSON object.")
    parser.add_argument("--cloud", choices=[*CLOUDS, AUTO], default=AUTO,
                        help="cloud whose trust and domain apply (default: auto, from the signer's name)")
    parser.add_argument("--nonce", help="expected nonce; without it the nonce is reported, not checked")
    parser.add_argument("--at", type=parse_instant, metavar="TIME",
                        help="ISO 8601 instant to verify at (default: now)")
    add_pinned_certs_option(parser)
    parser.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                        help="IMDS response JSON or bare base64 signature (default: standard input)")
    parser.set_defaults(handler=run_verify)


def _registrars() -> list[Callable[[Subparsers], None]]:
    # Imported here: each edge pulls in its own dependencies (Flask, gunicorn, redis), which the
    # offline commands should not pay for at start-up.
    from attest_service import certs  # noqa: PLC0415
    from attest_service.imds import cli as imds_cli  # noqa: PLC0415
    from attest_service.web import serve  # noqa: PLC0415

    return [serve.register, _register_verify, certs.register, imds_cli.register]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="attest-service",
        description="Verify Azure Instance Metadata Service attested documents, once per nonce.",
    )
    parser.add_argument("--version", action="version", version=f"attest-service {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m attest_service``."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        with warnings.catch_warnings():
            # cryptography warns about oddities of hostile certificates it still parses; the documents are
            # refused with a JSON verdict, and the warnings would only add noise to standard error.
            warnings.simplefilter("ignore")
            return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"attest-service {args.command}: {exc}\n")
        return EXIT_USAGE
    except ConfigurationError as exc:
        sys.stderr.write(f"attest-service {args.command}: {exc.message}\n")
        return EXIT_USAGE
