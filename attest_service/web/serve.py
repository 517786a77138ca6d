"""``attest-service serve``: validate the configuration, then become gunicorn with the service's config module.

Settings, policy file, pinned directory and store URL are checked here first, so a bad value stops the
command with a message naming it (exit 2) instead of gunicorn's "worker failed to boot" loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from attest_service.config import Settings
from attest_service.errors import ConfigurationError
from attest_service.nonces import open_store
from attest_service.policy import load_policy
from attest_service.trust import load_trust

if TYPE_CHECKING:
    from attest_service.cli import Subparsers

#: Default listening address: loopback, so nothing is exposed until the operator says so.
DEFAULT_BIND: Final = "127.0.0.1:8080"
#: Default worker processes: one per core of a small machine (each serves many connections cooperatively).
DEFAULT_WORKERS: Final = 2
#: More workers than this is a typo: each one holds its own connections and verifier caches.
MAX_WORKERS: Final = 256
#: The gunicorn configuration module (``python:`` form: imported, not read as a file path).
GUNICORN_CONFIG: Final = "python:attest_service.web.gunicorn_conf"
#: The WSGI application gunicorn loads in each worker.
WSGI_APP: Final = "attest_service.web:create_app()"
#: Where prometheus-client keeps the workers' metric files.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


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


def check_configuration(env: dict[str, str] | None = None) -> Settings:
    """Everything a worker will load, loaded once here; raises ConfigurationError naming the bad setting."""
    settings = Settings.from_env(env)
    load_policy(settings.policy_file, api_clients=frozenset(settings.api_keys))
    load_trust(settings.pinned_certs)
    # Parses the URL without contacting the store: a store that is down at start-up is a readiness
    # matter (/readyz answers 503), not a reason to refuse to start.
    open_store(settings.nonce_store_url, timeout_seconds=settings.store_timeout_seconds).close()
    return settings


def metrics_directory() -> str:
    """``PROMETHEUS_MULTIPROC_DIR``, or a fresh private temporary directory when unset; must be writable."""
    configured = os.environ.get(MULTIPROC_ENV)
    if not configured:
        return tempfile.mkdtemp(prefix="attest-metrics-")
    path = Path(configured)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{MULTIPROC_ENV}: {configured} is not a writable directory")
    return configured


def gunicorn_argv(*, bind: str, workers: int) -> list[str]:
    """The command line that runs gunicorn with the service's configuration."""
    return [sys.executable, "-m", "gunicorn", "--config", GUNICORN_CONFIG, "--bind", bind,
            "--workers", str(workers), WSGI_APP]


def run_serve(args: argparse.Namespace) -> int:
    """Validate the configuration and replace this process with gunicorn; returns only on failure."""
    check_configuration()
    os.environ[MULTIPROC_ENV] = metrics_directory()
    argv = gunicorn_argv(bind=args.bind, workers=args.workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our own interpreter with a fixed argument list


def register(subparsers: Subparsers) -> None:
    """Add the ``serve`` sub-command."""
    parser = subparsers.add_parser("serve", help="run the REST service under gunicorn",
                                   description="Run the REST service under gunicorn (settings: ATTEST_* variables).")
    parser.add_argument("--bind", type=_bind, default=DEFAULT_BIND, metavar="HOST:PORT",
                        help=f"address to listen on (default: {DEFAULT_BIND})")
    parser.add_argument("--workers", type=_workers, default=DEFAULT_WORKERS, metavar="N",
                        help=f"worker processes (default: {DEFAULT_WORKERS})")
    parser.set_defaults(handler=run_serve)
