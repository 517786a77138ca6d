"""Start the service: validate the configuration, then become gunicorn with the service's config module.

Settings, policy file, pinned directory and store URL are checked here first, so a bad value stops the
command with a message naming it (exit 2) instead of gunicorn's "worker failed to boot" loop. The
``serve`` command (:mod:`attest_service.cli.serve`) parses its options and calls :func:`exec_gunicorn`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Final, NoReturn

from attest_service.callers.policy import load_policy
from attest_service.errors import ConfigurationError
from attest_service.nonces import open_store
from attest_service.settings import Settings
from attest_service.trust import load_trust

#: The gunicorn configuration module (``python:`` form: imported, not read as a file path).
GUNICORN_CONFIG: Final = "python:attest_service.server.gunicorn_conf"
#: The WSGI application gunicorn loads in each worker.
WSGI_APP: Final = "attest_service.web:create_app()"
#: Where prometheus-client keeps the workers' metric files.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def check_configuration(env: dict[str, str] | None = None) -> Settings:
    """Everything a worker will load, loaded once here; raises ConfigurationError naming the bad setting."""
    settings = Settings.from_env(env)
    load_policy(settings.policy_file, api_clients=frozenset(settings.api_keys))
    load_trust(settings.pinned_certs)
    # Parses the URL without contacting the store: a store that is down at start-up is a readiness
    # matter (/readyz answers 503), not a reason to refuse to start.
    try:
        open_store(settings.nonce_store_url, timeout_seconds=settings.store_timeout_seconds).close()
    except ConfigurationError as exc:
        raise ConfigurationError(f"ATTEST_NONCE_STORE: {exc.message}") from exc
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


def exec_gunicorn(*, bind: str, workers: int) -> NoReturn:
    """Validate the configuration and replace this process with gunicorn; returns only by raising."""
    check_configuration()
    os.environ[MULTIPROC_ENV] = metrics_directory()
    argv = gunicorn_argv(bind=bind, workers=workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our own interpreter with a fixed argument list
