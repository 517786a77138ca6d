"""``attest-service api-key new CLIENT_ID``: mint a strong API key and the entry that admits it.

The service stores only the SHA-256 of each key (``ATTEST_API_KEYS=client_id:sha256hex,...``) and a blocked
source may still guess online at a bounded rate, so a key must be unguessable: 256 random bits from the
operating system's generator (:func:`secrets.token_urlsafe`), written as 43 URL-safe characters. The key is
printed once, for the operator to hand to the client; nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from typing import TYPE_CHECKING, Final

from attest_service.cli.common import EXIT_VERIFIED, UsageError
from attest_service.settings import api_key_entry

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

#: Random bytes in a minted key: 256 bits.
KEY_BYTES: Final = 32

_DESCRIPTION: Final = """\
Print a new random API key (256 bits) for CLIENT_ID and its ATTEST_API_KEYS entry (client_id:sha256hex).
Give the key to the client; add the entry to ATTEST_API_KEYS, comma-separated. A client may have several
entries at once, which is how a key is rotated without downtime: add the new entry, move the client to the
new key, then remove the old entry."""


def register(subparsers: Subparsers) -> None:
    """Add ``api-key`` and its ``new`` sub-command."""
    parser = subparsers.add_parser("api-key", help="mint API keys for ATTEST_API_KEYS",
                                   description="Mint API keys for the clients of ATTEST_API_KEYS.")
    actions = parser.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="print a new key and its ATTEST_API_KEYS entry", description=_DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    new.add_argument("client_id", metavar="CLIENT_ID",
                     help="the client the key is for (letters, digits, '.', '_', '-'; as in ATTEST_POLICY_FILE)")
    new.add_argument("--json", action="store_true",
                     help='print {"client_id", "key", "entry"} as one JSON object instead of two lines')
    new.set_defaults(handler=_new)


def _new(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(KEY_BYTES)
    try:
        entry = api_key_entry(args.client_id, key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        sys.stdout.write(json.dumps({"client_id": args.client_id, "key": key, "entry": entry}) + "\n")
    else:
        sys.stdout.write(f"key:   {key}\nentry: {entry}\n")
    return EXIT_VERIFIED


__all__ = ["KEY_BYTES", "register"]
