"""The nonce store protocol and the rules every backend shares.

A nonce is accepted once, ever, across every worker and replica that share a store. Two kinds of record exist:

* a **challenge**: a nonce the service issued to one client, live until its ``expires_at``;
* a **seen** record: a nonce that was accepted, with the client that presented it and whether it was a
  challenge; a caller-chosen nonce is recorded per scope (the VM whose document carried it), a consumed
  challenge once for every scope. It lives at least until the document carrying it has expired
  (``expires_at``, which the caller computes as the document's ``expiresOn`` plus the clock skew), until the
  challenge it consumed would have expired, and for at least one challenge lifetime after acceptance.

Every decision about a nonce is one atomic operation in the backend (a Lua script in Redis, one
``BEGIN IMMEDIATE`` transaction in SQLite), so two workers racing on one nonce cannot both win. Instants come
from the caller as aware datetimes; the only clock the stores consult on their own is Redis's key expiry.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol, runtime_checkable

from attest_service.errors import NonceReplayed, RateLimited

#: Default lifetime of a service-issued challenge (seconds); the minimum lifetime of a seen record.
DEFAULT_CHALLENGE_TTL_SECONDS: Final = 300.0
#: Default bound on one store round trip, connect and read alike (seconds).
DEFAULT_TIMEOUT_SECONDS: Final = 0.5
#: Message telling a VM that it presented, again, a challenge it had already consumed. IMDS caches attested
#: documents for a few minutes, so a VM that asks again too soon gets the old document with the old nonce.
CACHED_DOCUMENT_HINT: Final = "IMDS returned a cached document; fetch a fresh one"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND: Final = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acceptance:
    """A nonce was accepted; ``challenge`` tells whether it consumed a service-issued challenge."""

    challenge: bool


@runtime_checkable
class NonceStore(Protocol):
    """Records challenges and accepted nonces so that no nonce is accepted twice.

    Every method raises :class:`~attest_service.errors.StoreUnavailable` when the backend cannot be reached
    or fails; nothing is ever accepted without a store answer (fail closed).
    """

    def issue_challenge(self, nonce: str, *, client_id: str, expires_at: datetime, now: datetime | None = None) -> None:
        """Record ``nonce`` as a challenge for ``client_id``, live until ``expires_at``.

        ``now`` is the caller's instant, for a store that cleans up expired records itself (SQLite).
        Raises :class:`~attest_service.errors.NonceReplayed` if a challenge with this nonce already exists.
        """

    def accept(
        self, nonce: str, *, client_id: str, expires_at: datetime, require_challenge: bool, now: datetime,
        scope: str | None = None,
    ) -> Acceptance:
        """Accept ``nonce`` once, atomically.

        ``scope`` is what a caller-chosen nonce is claimed within: the VM that signed the document (its
        ``vmId``). Such a nonce is accepted once per scope, so one VM's documents never block another's; a
        claim without a scope is accepted once overall, and refused once any scope claimed the nonce. A live
        challenge is consumed once, whatever the scope, and refuses every later claim of its nonce.

        Raises :class:`~attest_service.errors.NonceReplayed` when it was accepted before, and
        :class:`~attest_service.errors.NonceUnknown` when it is a live challenge of another client, or when
        ``require_challenge`` is set and no live challenge of ``client_id`` carries it. Otherwise records it as
        seen until at least ``expires_at`` (consuming the challenge, if there is one).
        """

    def hit_rate(self, client_id: str, *, limit: int, window_seconds: int, now: datetime, count: int = 1) -> int:
        """Count requests of ``client_id``; raises :class:`~attest_service.errors.RateLimited` past ``limit``.

        The count is a sliding window of ``window_seconds`` (the previous fixed window weighted by how much of
        it still overlaps, plus the current one), shared by everything using the same store. ``count`` asks
        for that many requests at once (a lease, see :mod:`attest_service.callers.leases`): as many as still fit,
        at least one, are counted, and their number is returned. Refused requests are not counted.
        """

    def ping(self) -> None:
        """Round-trip to the backend; raises :class:`~attest_service.errors.StoreUnavailable` if it fails."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""


# --- shared rules ---------------------------------------------------------------------------------------


def epoch_ms(instant: datetime) -> int:
    """Milliseconds since the Unix epoch of an aware datetime; naive datetimes are a programming error."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant.isoformat()} given to the nonce store; pass an aware one")
    return (instant - _EPOCH) // _MILLISECOND


def check_nonce(nonce: str, client_id: str) -> None:
    """Refuse empty nonces and client ids: they are programming errors, never valid input."""
    if not nonce:
        raise ValueError("empty nonce given to the nonce store")
    if not client_id:
        raise ValueError("empty client id given to the nonce store")


def check_scope(scope: str | None) -> None:
    """Refuse an empty scope: a caller without one passes ``None``."""
    if scope is not None and not scope:
        raise ValueError("empty scope given to the nonce store; pass None for none")


def scope_tag(scope: str) -> str:
    """The fixed-length digest a scope is recorded under (hex, 128 bits; no separator can occur in it).

    A collision could only make one VM's record refuse another VM's document: never accept a replay.
    """
    return hashlib.sha256(scope.encode("utf-8")).hexdigest()[:32]


#: Extra lifetime of a seen record past the last instant its document can be accepted. Replicas (and
#: Redis itself) judge time by their own clocks; a record forgotten by one clock while another replica's
#: clock still accepts the document would reopen it to replay. An hour covers any clock that NTP keeps,
#: at the cost of ~200 bytes per nonce kept an hour longer.
CLOCK_DISAGREEMENT_MARGIN_SECONDS: Final = 3600


def seen_until_ms(*, expires_at: datetime, now: datetime, challenge_ttl_seconds: float) -> int:
    """When a seen record may be forgotten: past expiry plus the clock margin, and a challenge lifetime on."""
    return max(epoch_ms(expires_at) + CLOCK_DISAGREEMENT_MARGIN_SECONDS * 1000,
               epoch_ms(now) + math.ceil(challenge_ttl_seconds * 1000))


def seen_ttl_ms(*, expires_at: datetime, now: datetime, challenge_ttl_seconds: float) -> int:
    """The seen record's lifetime relative to ``now``, always positive.

    Relative, so that a store whose clock runs ahead of the caller's can never drop a record the moment
    it is written.
    """
    until = seen_until_ms(expires_at=expires_at, now=now, challenge_ttl_seconds=challenge_ttl_seconds)
    return until - epoch_ms(now)


def replayed(nonce: str, *, client_id: str, seen_client_id: str, seen_challenge: bool) -> NonceReplayed:
    """The error for a second acceptance, explaining the likely cause when it is the client's own challenge."""
    if seen_challenge and seen_client_id == client_id:
        return NonceReplayed(f"nonce {nonce!r} was already accepted as this client's challenge: {CACHED_DOCUMENT_HINT}")
    # The record of another client is not described further: its client id is not this caller's business.
    return NonceReplayed(f"nonce {nonce!r} was already accepted")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateWindow:
    """The fixed windows a sliding-window count at ``now`` is made of (times in milliseconds since the epoch)."""

    index: int
    elapsed_ms: int
    window_ms: int

    @classmethod
    def at(cls, now: datetime, window_seconds: int) -> RateWindow:
        """The window containing ``now``."""
        if window_seconds <= 0:
            raise ValueError(f"rate window must be positive, got {window_seconds} s")
        window_ms = window_seconds * 1000
        index, elapsed_ms = divmod(epoch_ms(now), window_ms)
        return cls(index=index, elapsed_ms=elapsed_ms, window_ms=window_ms)

    @property
    def expires_ms(self) -> int:
        """When the current window's counter is no longer needed: after it served as the previous window."""
        return (self.index + 2) * self.window_ms

    def allows(self, *, previous: int, current: int, limit: int) -> bool:
        """Whether one more request fits: ``previous * (1 - elapsed/window) + current + 1 <= limit``.

        Written in integers (multiplied through by the window) so that Redis's Lua and Python agree exactly.
        """
        return previous * (self.window_ms - self.elapsed_ms) + (current + 1) * self.window_ms <= limit * self.window_ms

    def room(self, *, previous: int, current: int, limit: int) -> int:
        """How many more requests fit now (0 or less: none); ``room >= 1`` exactly when :meth:`allows`.

        The largest ``k`` with ``previous * (window - elapsed) + (current + k) * window <= limit * window``.
        """
        return (limit * self.window_ms - previous * (self.window_ms - self.elapsed_ms)) // self.window_ms - current

    def refusal(self, *, previous: int, current: int, limit: int) -> RateLimited:
        """The error for a refused request, with the whole seconds after which one more request fits."""
        wait_ms = self._wait_ms(previous=previous, current=current, limit=limit)
        retry_after = max(1, math.ceil(wait_ms / 1000))
        return RateLimited(f"more than {limit} requests per {self.window_ms // 1000} s", retry_after=retry_after)

    def _wait_ms(self, *, previous: int, current: int, limit: int) -> int:
        room = limit - 1 - current
        if room >= 0 and previous > 0:
            # Still in this window: wait until the previous window's weight has decayed enough.
            needed_elapsed = self.window_ms - (room * self.window_ms) // previous
            return max(needed_elapsed - self.elapsed_ms, 0)
        # This window is full: in the next one, the current count becomes the weighted previous count.
        until_next = self.window_ms - self.elapsed_ms
        if limit <= 1 or current <= 0:
            return until_next + (self.window_ms if limit <= 1 else 0)
        needed_elapsed = self.window_ms - ((limit - 1) * self.window_ms) // current
        return until_next + max(needed_elapsed, 0)


#: URL schemes of the Redis backend (:mod:`attest_service.nonces.redis`), known here so that a URL can be
#: dispatched without importing redis.
REDIS_SCHEMES: Final = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` and its query dropped, for logs and messages.

    redis-py also reads a password from the query (``?password=...``), so no query is ever shown.
    """
    scheme, sep, rest = url.partition("://")
    rest, question, _ = rest.partition("?")
    query = "?***" if question else ""
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return f"{scheme}{sep}{rest}{query}"
    userinfo, _, hosts = authority.rpartition("@")
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}{slash}{path}{query}"
