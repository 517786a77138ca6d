"""The ``keys`` command: ``keys new DIR`` writes a result-signing key and prints its ``kid``.

The key is written with mode 0600, named to sort after the keys already in ``DIR``: added to the directory
a running service reads (``ATTEST_RESULT_KEYS``), it is published in the JWK Set and, sorting last, signs
the next results. The rotation runbook (docs/OPERATIONS.md) says how to add it without a relying party
ever seeing a result signed by a key it does not know yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from attest_service.cli.common import EXIT_VERIFIED, UsageError
from attest_service.errors import ConfigurationError
from attest_service.results import ALGORITHMS, write_new_key

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers


def run_new(args: argparse.Namespace) -> int:
    """Write one key; print its ``kid`` alone on standard output (for scripts), its file on standard error."""
    try:
        key = write_new_key(args.directory, args.algorithm)
    except ConfigurationError as exc:
        raise UsageError(exc.message) from exc
    sys.stdout.write(key.kid + "\n")
    sys.stderr.write(f"wrote {key.alg} key {args.directory / key.name}\n")
    return EXIT_VERIFIED


def register(subparsers: Subparsers) -> None:
    """Add the ``keys`` sub-command and its ``new`` action."""
    parser = subparsers.add_parser("keys", help="manage the keys that sign attestation results",
                                   description="Manage the keys that sign attestation results (ATTEST_RESULT_KEYS).")
    actions = parser.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="write a new private key (mode 0600) that sorts last, print its kid",
                             description="Write a new result-signing private key to DIR (mode 0600), named to sort "
                                         "after the keys already there, and print its kid.")
    new.add_argument("directory", type=Path, metavar="DIR", help="the key directory (created when missing)")
    new.add_argument("--algorithm", choices=ALGORITHMS, default="ES256",
                     help="ES256 (P-256, default), RS256 (RSA 3072) or EdDSA (Ed25519)")
    new.set_defaults(handler=run_new)
