"""How often a caller may call: who is calling (authentication), then its rate budget, for either path.

``/v1/challenges`` and ``/v1/verify`` share one budget per caller (per client id; per source for anonymous
callers, see :mod:`attest_service.callers.sources`) of ``ATTEST_RATE_LIMIT_PER_MINUTE`` requests, counted in the
nonce store so that it holds across workers and replicas (a busy caller's in leases,
:mod:`attest_service.callers.leases`). An anonymous source may also hold at most ``ATTEST_ANONYMOUS_CHALLENGES``
challenges per challenge lifetime. A store failure while counting is reported to the injected
:class:`~attest_service.nonces.failures.StoreErrorEvents` and raised on.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Final

from attest_service.callers.authentication import Authenticator
from attest_service.callers.keys import Caller
from attest_service.callers.leases import RateLeases
from attest_service.nonces import NonceStore
from attest_service.nonces.failures import StoreErrorEvents, store_errors_reported
from attest_service.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The rate-limit window, in seconds; the limit is per minute.
RATE_WINDOW_SECONDS: Final = 60
#: The store key of an anonymous source's challenge budget.
ANONYMOUS_CHALLENGES_PREFIX: Final = "-challenges@"


class Admission:
    """Admits the caller of a request, or refuses it (401, 429); one per process, shared by both paths."""

    __slots__ = ("_authenticator", "_challenge_window", "_clock", "_events", "_leases", "_settings", "_store")

    def __init__(self, *, settings: Settings, authenticator: Authenticator, store: NonceStore,
                 leases: RateLeases, events: StoreErrorEvents, clock: Callable[[], datetime]) -> None:
        self._settings = settings
        self._authenticator = authenticator
        self._store = store
        self._leases = leases
        self._events = events
        self._clock = clock
        # A challenge is a record the store keeps for its lifetime: the anonymous budget spans that lifetime.
        self._challenge_window = max(1, int(settings.challenge_ttl.total_seconds()))

    def caller(self, environ: WSGIEnvironment) -> Caller:
        """The caller of the request in ``environ``, charged one request of its rate budget.

        Raises Unauthorized (401), RateLimited (429, a blocked source or a spent budget) or StoreUnavailable
        (reported to the events as a ``hit_rate`` failure).
        """
        caller = self._authenticator.authenticate(environ)
        with store_errors_reported(self._events, "hit_rate"):
            self._leases.take(caller.rate_key, limit=self._settings.rate_limit_per_minute,
                              window_seconds=RATE_WINDOW_SECONDS, now=self._clock())
        return caller

    def challenge(self, caller: Caller) -> None:
        """Charge one challenge to an anonymous caller's source; raises RateLimited when its budget is spent.

        An anonymous source is not accountable for the records its challenges leave in the store, so their
        number is bounded per source; a caller with a key is bounded by its rate alone.
        """
        if not caller.anonymous:
            return
        with store_errors_reported(self._events, "hit_rate"):
            self._store.hit_rate(ANONYMOUS_CHALLENGES_PREFIX + caller.source,
                                 limit=self._settings.anonymous_challenges, window_seconds=self._challenge_window,
                                 now=self._clock())
