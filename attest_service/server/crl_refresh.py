"""Keeping the trust directory's CRLs current beside the service (``ATTEST_CRL_REFRESH_SECONDS``).

The gunicorn master starts one child process running ``attest-service certs crls fetch --every SECONDS``
against the pinned directory, and stops it when it exits. The fetching (network I/O, CRLs of several MB) thus
never runs in a worker, never on the request path and never in the master itself, whose only work between
forks must stay short; the CRLs it writes (atomically) reach the workers like any change of the directory, by
their reload. One refresher per pod, whatever the number of workers. Its output goes to the service's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from typing import IO, Final

from attest_service.settings import Settings

LOG: Final = logging.getLogger(__name__)
#: Seconds the refresher gets to stop on SIGTERM before it is killed.
STOP_SECONDS: Final = 5.0

_process: subprocess.Popen[bytes] | None = None


def command(settings: Settings) -> list[str]:
    """The refresher's command line for ``settings``, started by this process (which it exits without)."""
    return [sys.executable, "-m", "attest_service", "certs", "crls", "fetch", "--every",
            f"{settings.crl_refresh_seconds:g}", "--parent-pid", str(os.getpid()), "--pinned-certs",
            str(settings.pinned_certs)]


def start(settings: Settings, *, output: IO[bytes] | None = None) -> None:
    """In the master: start the refresher when ``settings`` ask for one (once); ``output`` default: the master's."""
    global _process  # noqa: PLW0603 - one refresher per master
    if settings.crl_refresh_seconds <= 0 or _process is not None:
        return
    _process = subprocess.Popen(command(settings), stdin=subprocess.DEVNULL,  # noqa: S603 - our own command
                                stdout=output, stderr=output)
    LOG.info("CRL refresh: fetching the CRLs of %s every %g s (process %d)", settings.pinned_certs,
             settings.crl_refresh_seconds, _process.pid)


def stop() -> None:
    """In the master, on exit: stop the refresher."""
    global _process
    process, _process = _process, None
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_SECONDS)
    except ChildProcessError:
        pass  # gunicorn's reaper collected it first


def forget() -> None:
    """In a forked worker: the refresher is the master's child, not the worker's."""
    global _process  # noqa: PLW0603 - one refresher per master
    _process = None
