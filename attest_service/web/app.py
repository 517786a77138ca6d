"""Building the Flask application: settings, access policy, trust, store, routes and error handlers.

Settings, the access policy and the pinned trust are read and validated here, once per process; a bad
value raises :class:`~attest_service.errors.ConfigurationError` before any request is served. The policy
file and the pinned directory are then reloaded when they change (:mod:`attest_service.callers.reloading`,
:mod:`attest_service.trust.reload`), at the same interval, so that every worker serves the same. Under
gunicorn a worker has a fallback: when its policy file or pinned directory does not load, it serves with
what the master loaded last (:mod:`attest_service.server.master`) and reports the failure, instead of failing
to boot and halting the server.
"""

from __future__ import annotations

import logging
import secrets

from flask import Flask, Response, g, request

from attest_service.attestation import Attestor
from attest_service.callers import throttle
from attest_service.callers.authentication import Authenticator
from attest_service.callers.leases import RateLeases
from attest_service.callers.ratelimit import Admission
from attest_service.callers.reloading import ReloadingPolicy
from attest_service.callers.throttle import FailedAuthBlocks
from attest_service.logformat import REQUEST_ID
from attest_service.nonces import NonceStore, open_store
from attest_service.results import ResultSigner
from attest_service.server import master
from attest_service.settings import Settings
from attest_service.trust import TrustStore, crl_wanted
from attest_service.trust.aia import AiaFetcher
from attest_service.trust.fetched import PinnedCaFetcher, cache_dir_for_store
from attest_service.trust.reload import ReloadingVerifier
from attest_service.web import metrics
from attest_service.web.body import BodyGate, announced_length
from attest_service.web.edges import finish_response
from attest_service.web.errors import register_error_handlers
from attest_service.web.fastpath import VerifyFastPath
from attest_service.web.routes import api
from attest_service.web.service import (
    REQUEST_ID_HEADER,
    Clock,
    Service,
    current_service,
    install,
    request_id,
    system_clock,
)


def document_verifier(settings: Settings, *, aia: AiaFetcher | None = None,
                      last_good: TrustStore | None = None,
                      pinned_fetch: PinnedCaFetcher | None = None) -> ReloadingVerifier:
    """The verification core over the pinned directory of ``settings``, reloaded when the directory changes.

    ``aia`` is the fetcher used when the AIA fallback is on (default: Azure's allow-list, public addresses);
    ``last_good`` is served when the directory does not load now (see :class:`ReloadingVerifier`);
    ``pinned_fetch`` fetches the CAs pinned by fingerprint in the background (default: Azure's allow-list,
    public addresses, kept beside the embedded store's SQLite file).
    """
    # The AIA fallback is off unless the operator turns it on: it fetches whatever CA a document names.
    fetcher = (aia if aia is not None else AiaFetcher()) if settings.aia_fetch else None
    # A fingerprint pin names exact bytes, so fetching them cannot widen trust: on by default, off the request path.
    if pinned_fetch is None and settings.fingerprint_fetch:
        pinned_fetch = PinnedCaFetcher(cache_dir=cache_dir_for_store(settings.nonce_store_url))
    return ReloadingVerifier(settings.pinned_certs, interval_seconds=settings.trust_reload_seconds, aia=fetcher,
                             last_good=last_good, pinned_fetch=pinned_fetch)


def result_signer(settings: Settings, *, snapshot: master.Snapshot | None = None) -> ResultSigner | None:
    """The signer of attestation results ``settings`` describe, or None when results are off.

    Outside gunicorn the embedded default directory gets its one generated key here (under gunicorn the
    master made it before forking, and its snapshot says whether it could). The master's last good keys
    (``snapshot``) are used when the directory does not load now.
    """
    if settings.result_keys is None:
        return None
    if settings.result_keys_generated:
        made = master.default_key_ready(settings) if snapshot is None else snapshot.result_keys is not None
        if not made:
            return None
    last_good = snapshot.result_keys if snapshot is not None else None
    return ResultSigner(settings.result_keys, issuer=settings.result_issuer, ttl=settings.result_ttl,
                        reload_seconds=settings.trust_reload_seconds, last_good=last_good,
                        events=metrics.MetricEvents())


def _access_policy(settings: Settings, snapshot: master.Snapshot | None) -> ReloadingPolicy:
    """The access policy, reloaded when the policy file changes, as the pinned trust is.

    When the file does not load now, the master's snapshot is served (and reported) until it does. Outside
    gunicorn nothing says where the application listens, so it is treated as reachable from anywhere.
    """
    loopback = snapshot is not None and snapshot.loopback_only
    return ReloadingPolicy(lambda: master.access_policy(settings, loopback=loopback), settings.policy_file,
                           interval_seconds=settings.trust_reload_seconds,
                           fallback=snapshot.access if snapshot is not None else None)


def _assign_request_id() -> None:
    g.request_id = request_id(request.headers.get(REQUEST_ID_HEADER))
    # Every line logged while this request is answered carries its id (attest_service.logformat).
    REQUEST_ID.set(g.request_id)
    # Refuse an announced oversized (or unusable) body length before reading any of it, on every route.
    announced_length(request.environ)


def _forget_request_id(_error: BaseException | None) -> None:
    # Lines written between requests (on a kept-alive connection's greenlet) belong to none.
    REQUEST_ID.set(None)


def _finish(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    return finish_response(response, g.get("request_id") or secrets.token_hex(16), rule, request.environ,
                           current_service().bodies)


def create_app(settings: Settings | None = None, *, store: NonceStore | None = None,
               clock: Clock | None = None, aia: AiaFetcher | None = None,
               pinned_fetch: PinnedCaFetcher | None = None) -> Flask:
    """Build the application.

    ``settings`` default to :meth:`Settings.from_env`; ``store`` to the store ``ATTEST_NONCE_STORE`` names;
    ``clock`` (returning aware datetimes) to the system clock; ``aia`` to the default AIA fetcher, used
    only when ``ATTEST_AIA_FETCH`` is on (tests pass one that reaches a CA server on loopback); ``pinned_fetch``
    to the background fetcher of fingerprint-pinned CAs (tests likewise). Raises
    ConfigurationError for invalid settings, policy file or pinned directory.
    """
    settings = settings if settings is not None else Settings.from_env()
    snapshot = master.inherited()
    policies = _access_policy(settings, snapshot)
    trust = document_verifier(settings, aia=aia, last_good=snapshot.trust if snapshot is not None else None,
                              pinned_fetch=pinned_fetch)
    if settings.crl_refresh_seconds:
        # The fetch beside the service learns the issuing CAs' CRL URLs from the signers verified here.
        crl_wanted.enable(settings.pinned_certs)
    if store is None:
        store = open_store(settings.nonce_store_url, timeout_seconds=settings.store_timeout_seconds,
                           challenge_ttl_seconds=settings.challenge_ttl.total_seconds(),
                           min_replicas=settings.store_min_replicas)
    logging.getLogger("attest_service").setLevel(settings.log_level.upper())

    app = Flask(__name__)
    # Claims are returned exactly as signed, in their signed order.
    app.json.sort_keys = False  # type: ignore[attr-defined]
    events = metrics.MetricEvents()
    if snapshot is None:
        master.log_results_state(settings)
    results = result_signer(settings, snapshot=snapshot)
    attestor = Attestor(trust, store, clock_skew=settings.clock_skew, challenge_ttl=settings.challenge_ttl,
                        events=events, revocation=settings.revocation, results=results)
    service_clock = clock if clock is not None else system_clock
    authenticator = Authenticator(
        settings=settings, policies=policies, api_keys=settings.api_keys, store=store, events=events,
        clock=service_clock,
        # Under gunicorn, the table the master made before it forked: a source blocked by one worker is
        # blocked by all. Elsewhere (tests, embedding), the application's own.
        blocks=throttle.SHARED_BLOCKS if snapshot is not None else FailedAuthBlocks())
    service = Service(settings=settings, store=store, attestor=attestor, policies=policies, clock=service_clock,
                      admission=Admission(settings=settings, authenticator=authenticator, store=store,
                                          leases=RateLeases(store), events=events, clock=service_clock),
                      events=events,
                      bodies=BodyGate(settings.body_timeout_seconds))
    install(app, service)
    register_error_handlers(app)
    app.before_request(_assign_request_id)
    app.teardown_request(_forget_request_id)
    app.after_request(_finish)
    app.register_blueprint(api)
    # In front of Flask, as WSGI middleware is installed (Flask's documentation of wsgi_app).
    app.wsgi_app = VerifyFastPath(service, app.wsgi_app)  # type: ignore[method-assign]
    return app


