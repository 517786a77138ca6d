"""The ``serve`` command: options, then the service's own start-up (:mod:`attest_service.server.serve`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from attest_service.cli.common import Subparsers

#: Default listening address: loopback, so nothing is exposed until the operator says so.
DEFAULT_BIND: Final = "127.0.0.1:8080"
#: Default worker processes: one per core of a small machine (each serves many connections cooperatively).
DEFAULT_WORKERS: Final = 2
#: More workers than this is a typo: each one holds its own connections and verifier caches.
MAX_WORKERS: Final = 256


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return value


def _bind(text: str) -> str:
    if text.startswith("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def run_serve(args: argparse.Namespace) -> int:
    """Validate the configuration and replace this process with gunicorn; returns only on failure."""
    # The web stack (Flask, gunicorn, redis, prometheus-client) loads here, for this command only: the
    # offline commands share this parser and must start without it.
    from attest_service.server.serve import exec_gunicorn  # noqa: PLC0415

    exec_gunicorn(bind=args.bind, workers=args.workers)


def register(subparsers: Subparsers) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser("serve", help="run the REST service under gunicorn",
                                   description="Run the REST service under gunicorn (settings: ATTEST_* variables).")
    parser.add_argument("--bind", type=_bind, default=DEFAULT_BIND, metavar="HOST:PORT",
                        help=f"address to listen on (default: {DEFAULT_BIND})")
    parser.add_argument("--workers", type=_workers, default=DEFAULT_WORKERS, metavar="N",
                        help=f"worker processes (default: {DEFAULT_WORKERS})")
    parser.set_defaults(handler=run_serve)
