"""The ``attest-service`` command line: one module a sub-command, each a thin call into the library.

- :mod:`~attest_service.cli.verify`: ``verify``, offline verification of one document;
- :mod:`~attest_service.cli.certs`: ``certs``, operations on the pinned trust;
- :mod:`~attest_service.cli.keys`: ``keys new``, a key that signs attestation results;
- :mod:`~attest_service.cli.serve`: ``serve``, the REST service under gunicorn;
- :mod:`~attest_service.cli.imds`: ``imds-emulator`` and ``attest``, the VM side;
- :mod:`~attest_service.cli.apikey`: ``api-key new``, minting a client's API key.

Each module has a ``register(subparsers)`` function that sets ``handler`` to a function taking the parsed
arguments and returning the exit code; :mod:`~attest_service.cli.common` holds what they share. The offline
commands load no part of the service's runtime: ``serve`` and ``imds-emulator`` import the web stack inside
their handlers.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from attest_service import __version__
from attest_service.cli import apikey, certs, imds, keys, serve, verify
from attest_service.cli.common import EXIT_REFUSED, EXIT_USAGE, Handler, UsageError
from attest_service.errors import ConfigurationError

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

#: Every sub-command, in the order ``--help`` lists them.
REGISTRARS: Final[tuple[Callable[[Subparsers], None], ...]] = (
    serve.register, verify.register, certs.register, keys.register, imds.register, apikey.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="attest-service",
        description="Verify Azure Instance Metadata Service attested documents, once per nonce.",
    )
    parser.add_argument("--version", action="version", version=f"attest-service {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
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
    except BrokenPipeError:
        # The reader of standard output went away (``certs list | head``): stop quietly, as a filter does,
        # and point standard output at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_REFUSED
    except UsageError as exc:
        sys.stderr.write(f"attest-service {args.command}: {exc}\n")
        return EXIT_USAGE
    except ConfigurationError as exc:
        sys.stderr.write(f"attest-service {args.command}: {exc.message}\n")
        return EXIT_USAGE
