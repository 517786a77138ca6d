"""Building the Flask application: settings, access policy, trust, store, routes and error handlers.

Settings, the access policy and the pinned trust are read and validated here, once per process; a bad
value raises :class:`~attest_service.errors.ConfigurationError` before any request is served.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Final

from flask import Flask, Response, g, request

from attest_service.access import load_policy
from attest_service.attestation import Attestor
from attest_service.nonces import NonceStore, open_store
from attest_service.trust.aia import AiaFetcher
from attest_service.trust.reload import TrustHolder
from attest_service.web import metrics
from attest_service.web.errors import RequestTooLarge, register_error_handlers
from attest_service.web.routes import api
from attest_service.web.service import (
    MAX_BODY_BYTES,
    Clock,
    Service,
    install,
    system_clock,
)
from attest_service.web.settings import Settings

#: Header carrying the request id, accepted from the caller (or a proxy) and echoed in every answer.
REQUEST_ID_HEADER: Final = "X-Request-Id"
#: A caller's request id is kept only when it is short and plain, so it cannot forge log lines.
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def document_verifier(settings: Settings, *, aia: AiaFetcher | None = None) -> TrustHolder:
    """The verification core over the pinned directory of ``settings``, reloaded when the directory changes.

    ``aia`` is the fetcher used when the AIA fallback is on (default: Azure's allow-list, public addresses).
    """
    # The AIA fallback is off unless the operator turns it on: it is the one path that reaches the network.
    fetcher = (aia if aia is not None else AiaFetcher()) if settings.aia_fetch else None
    return TrustHolder(settings.pinned_certs, interval_seconds=settings.trust_reload_seconds, aia=fetcher)


def _assign_request_id() -> None:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
    # Refuse an announced oversized body before reading any of it (Flask would only refuse while reading).
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body of {request.content_length} bytes is over the limit of "
                              f"{MAX_BODY_BYTES} bytes")


def _finish(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = g.get("request_id") or uuid.uuid4().hex
    if response.status_code == 413:
        # The unread body is still on the connection; closing it keeps the next request from reading junk.
        response.headers["Connection"] = "close"
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.HTTP_REQUESTS.labels(route=rule, status=str(response.status_code)).inc()
    return response


def create_app(settings: Settings | None = None, *, store: NonceStore | None = None,
               clock: Clock | None = None, aia: AiaFetcher | None = None) -> Flask:
    """Build the application.

    ``settings`` default to :meth:`Settings.from_env`; ``store`` to the store ``ATTEST_NONCE_STORE`` names;
    ``clock`` (returning aware datetimes) to the system clock; ``aia`` to the default AIA fetcher, used
    only when ``ATTEST_AIA_FETCH`` is on (tests pass one that reaches a CA server on loopback). Raises
    ConfigurationError for invalid settings, policy file or pinned directory.
    """
    settings = settings if settings is not None else Settings.from_env()
    access = load_policy(settings.policy_file, api_clients=frozenset(settings.api_keys))
    trust = document_verifier(settings, aia=aia)
    if store is None:
        store = open_store(settings.nonce_store_url, timeout_seconds=settings.store_timeout_seconds,
                           challenge_ttl_seconds=settings.challenge_ttl.total_seconds(),
                           min_replicas=settings.store_min_replicas)
    logging.getLogger("attest_service").setLevel(settings.log_level.upper())

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Claims are returned exactly as signed, in their signed order.
    app.json.sort_keys = False  # type: ignore[attr-defined]
    attestor = Attestor(trust, store, clock_skew=settings.clock_skew, challenge_ttl=settings.challenge_ttl,
                        events=metrics.MetricEvents())
    install(app, Service(settings=settings, store=store, attestor=attestor, access=access,
                         clock=clock if clock is not None else system_clock, api_keys=settings.api_keys))
    register_error_handlers(app)
    app.before_request(_assign_request_id)
    app.after_request(_finish)
    app.register_blueprint(api)
    return app


