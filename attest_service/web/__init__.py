"""The REST service: :func:`create_app` builds the Flask application (gunicorn calls ``create_app()``).

The application's modules are imported when an application is built, not when this package is: gunicorn's
master imports this package before it forks, and the metric objects must only be created in the processes
that serve (prometheus-client writes a file per process and metric in
``PROMETHEUS_MULTIPROC_DIR`` as soon as one exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from attest_service.nonces import NonceStore
    from attest_service.settings import Settings
    from attest_service.web.service import Clock


def create_app(settings: Settings | None = None, *, store: NonceStore | None = None,
               clock: Clock | None = None) -> Flask:
    """Build the application; see :func:`attest_service.web.app.create_app`."""
    from attest_service.web.app import create_app as build  # noqa: PLC0415 - see the module docstring

    return build(settings, store=store, clock=clock)


__all__ = ["create_app"]
