"""Who is calling: a request's source, its key, the source's budget of failed authentications, all in one place.

Checked in this order, for ``/v1/challenges`` and ``/v1/verify`` on either path:

1. the source (:mod:`attest_service.callers.sources`): the peer, or behind trusted proxies the client they name;
2. a source blocked for failed authentication is answered 429 before its key is looked at, a right key as a
   wrong one (:mod:`attest_service.callers.throttle`);
3. the key (:mod:`attest_service.callers.keys`): no key makes the caller anonymous where the policy admits
   anonymous callers. A wrong or missing key is counted against the source's budget in the nonce store, and
   the failure past the budget blocks the source;
4. an anonymous caller whose request came through a proxy needs a challenge even where the open mode
   admits callers' own nonces (the open mode on loopback is for callers on this machine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Final

from attest_service.callers.keys import Caller, authenticate
from attest_service.callers.policy import ANONYMOUS
from attest_service.callers.reloading import ReloadingPolicy
from attest_service.callers.sources import request_source
from attest_service.callers.throttle import BLOCKED_MESSAGE, FAILED_AUTH_PREFIX, FailedAuthBlocks
from attest_service.errors import RateLimited, Unauthorized
from attest_service.nonces import NonceStore
from attest_service.nonces.failures import StoreErrorEvents, store_errors_reported
from attest_service.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The window of the failed-authentication budget, in seconds; the budget is per minute.
FAILURE_WINDOW_SECONDS: Final = 60


class Authenticator:
    """Identifies the caller of a request (the steps of the module docstring); one per process."""

    def __init__(self, *, settings: Settings, policies: ReloadingPolicy, api_keys: Mapping[str, tuple[bytes, ...]],
                 store: NonceStore, blocks: FailedAuthBlocks, events: StoreErrorEvents,
                 clock: Callable[[], datetime]) -> None:
        self._settings = settings
        #: The access policy, reloaded when its file changes: each request asks for the one in force.
        self._policies = policies
        self._api_keys = api_keys
        self._store = store
        #: Sources blocked for failed authentication (shared by the workers of an instance under gunicorn).
        self.blocks = blocks
        self._events = events
        self._clock = clock

    def source(self, environ: WSGIEnvironment) -> str:
        """Where the request in ``environ`` came from, as every per-source budget counts it."""
        # The WSGI server joins repeated headers into one value, as werkzeug's headers.getlist() sees them too.
        return request_source(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"),
                              self._settings.trusted_proxies)

    def authenticate(self, environ: WSGIEnvironment) -> Caller:
        """The caller of the request in ``environ``; raises Unauthorized (401) or RateLimited (429).

        RateLimited while the source is blocked, whatever key it carries, and for the failure that uses up
        its budget; StoreUnavailable when the failure cannot be counted.
        """
        source = self.source(environ)
        # Before the key is looked at: otherwise the 429 tells a guesser which guess was right. Behind a NAT
        # or a proxy that is not a trusted proxy, the clients sharing the address share the block (README).
        self.blocks.check(source, self._clock())
        try:
            caller = authenticate(environ.get("HTTP_AUTHORIZATION"), source, api_keys=self._api_keys,
                                  access=self._policies.current())
        except Unauthorized:
            self._count_failure(source)
            raise
        return self._without_open_access_through_a_proxy(environ, caller)

    def _count_failure(self, source: str) -> None:
        try:
            with store_errors_reported(self._events, "hit_rate"):
                self._store.hit_rate(FAILED_AUTH_PREFIX + source, limit=self._settings.auth_failures_per_minute,
                                     window_seconds=FAILURE_WINDOW_SECONDS, now=self._clock())
        except RateLimited as limited:
            self.blocks.block(source, self._clock(), limited.retry_after)
            raise RateLimited(BLOCKED_MESSAGE, retry_after=limited.retry_after) from None

    def _without_open_access_through_a_proxy(self, environ: WSGIEnvironment, caller: Caller) -> Caller:
        # Open access on loopback is for callers on this machine. A request that came through a proxy (it says
        # so in X-Forwarded-For or Forwarded) may be anyone's: it must present a challenge unless the operator
        # opened the service explicitly.
        policy = caller.policy
        if caller.client_id != ANONYMOUS or policy.require_challenge or self._settings.allow_open:
            return caller
        if environ.get("HTTP_X_FORWARDED_FOR") is None and environ.get("HTTP_FORWARDED") is None:
            return caller
        return dataclasses.replace(caller, policy=dataclasses.replace(policy, require_challenge=True))
