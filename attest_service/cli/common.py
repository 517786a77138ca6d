"""What the sub-commands share: exit codes, usage errors, ``--at`` and ``--pinned-certs`` parsing, trust loading."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attest_service.errors import ConfigurationError
from attest_service.trust import TrustStore, load_trust, pinned_dir_from_env

#: Exit codes of ``verify`` (the contract): 0 verified, 1 refused, 2 usage.
EXIT_VERIFIED: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2

__all__ = [
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "EXIT_VERIFIED",
    "Handler",
    "UsageError",
    "add_pinned_certs_option",
    "load_trust_or_usage",
    "parse_instant",
    "pinned_dir",
]

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
    return explicit if explicit is not None else pinned_dir_from_env(os.environ)


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


