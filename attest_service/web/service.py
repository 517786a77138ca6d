"""What the views work with: settings, the nonce store, the attestation step, the access policy and the clock.

Built once per process by :func:`attest_service.web.create_app` and kept in ``app.extensions``; every field
is immutable or safe to share between the threads of a worker.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from flask import Flask, current_app

from attest_service.attestation import Attestor
from attest_service.callers.ratelimit import Admission
from attest_service.callers.reloading import ReloadingPolicy
from attest_service.nonces import NonceStore
from attest_service.nonces.failures import StoreErrorEvents
from attest_service.settings import DEFAULT_BODY_TIMEOUT_SECONDS, Settings
from attest_service.web.body import BodyGate

#: Key of the service state in ``app.extensions``.
EXTENSION: Final = "attest_service"

#: Header carrying the request id, accepted from the caller (or a proxy) and echoed in every answer.
REQUEST_ID_HEADER: Final = "X-Request-Id"
#: A caller's request id is kept only when it is short and plain, so it cannot forge log lines.
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Clock = Callable[[], datetime]


def request_id(offered: str | None) -> str:
    """The id of a request: the one the caller offered (``X-Request-Id``) when it is plain, else a new one."""
    if offered and _REQUEST_ID.fullmatch(offered):
        return offered
    # 32 hex digits of 128 random bits, as uuid4().hex gives but without building a UUID for each request.
    return secrets.token_hex(16)


def system_clock() -> datetime:
    """The current instant, timezone-aware (UTC)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """The per-process state of the REST service."""

    settings: Settings
    store: NonceStore
    attestor: Attestor
    #: The access policy, reloaded when its file changes (:class:`ReloadingPolicy`).
    policies: ReloadingPolicy
    clock: Clock
    #: Who is calling and how often: key, source, rate budgets (:mod:`attest_service.callers.ratelimit`).
    admission: Admission
    #: Where failed store operations are counted (the metrics).
    events: StoreErrorEvents
    #: The gate every request body passes (:mod:`attest_service.web.body`).
    bodies: BodyGate = field(default_factory=lambda: BodyGate(DEFAULT_BODY_TIMEOUT_SECONDS))


def install(app: Flask, service: Service) -> None:
    """Attach ``service`` to ``app``."""
    app.extensions[EXTENSION] = service


def current_service() -> Service:
    """The service of the application handling the current request."""
    service: Service = current_app.extensions[EXTENSION]
    return service
