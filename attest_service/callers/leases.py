"""Rate-budget leases: a busy caller's requests are counted in the shared store in batches, not one by one.

Counting every request in the nonce store costs a store round trip per request, as much worker CPU as the
verification itself for a caller with a large budget. A worker therefore asks the store for several
requests at once (:meth:`~attest_service.nonces.store.NonceStore.hit_rate` with ``count``) and serves them
from memory for at most :data:`LEASE_SECONDS`. Every request served was counted in the shared store before it
was served, so a caller never gets more than its limit across workers and replicas; what a lease holds and
does not use in time is lost, so a caller near its limit may be refused slightly early, never late.

How much a lease may hold is bounded twice: by :data:`LEASE_SHARE` of the caller's budget (a caller with
the default 600 requests a minute is counted one by one, exactly as before), and by what this worker used
of its last lease (a lease grows by doubling while it is used up, and shrinks to what was used when it
expires), so a worker that sees one request a second holds one, not a thousand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from attest_service.nonces import NonceStore

#: How long a leased request stays usable, in seconds: the stored count and the requests it stands for
#: are never more than this far apart.
LEASE_SECONDS: Final = 1.0
#: A lease holds at most ``limit // LEASE_SHARE`` requests (0.1 % of the per-window budget); a limit below
#: ``2 * LEASE_SHARE`` is counted request by request.
LEASE_SHARE: Final = 1000
#: Callers with a lease in one process; past it, expired leases go first, then the oldest (a lost lease only
#: ever makes its caller's limit stricter).
MAX_LEASES: Final = 10_000


@dataclass(slots=True)
class _Lease:
    left: int
    size: int
    used: int
    until: float


class RateLeases:
    """Per-process leases of rate budget over one nonce store; safe between threads and greenlets.

    The lock guards the table only; the store is never called while it is held.
    """

    def __init__(self, store: NonceStore, *, monotonic: Callable[[], float] = time.monotonic,
                 capacity: int = MAX_LEASES) -> None:
        self._store = store
        self._monotonic = monotonic
        self._capacity = capacity
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()

    def take(self, key: str, *, limit: int, window_seconds: int, now: datetime) -> None:
        """Count one request of ``key``; raises :class:`~attest_service.errors.RateLimited` past ``limit``.

        Raises :class:`~attest_service.errors.StoreUnavailable` when a new lease is needed and the store does
        not answer (fail closed: no request is served uncounted).
        """
        cap = limit // LEASE_SHARE
        if cap < 2:
            self._store.hit_rate(key, limit=limit, window_seconds=window_seconds, now=now)
            return
        instant = self._monotonic()
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.until > instant:
                if lease.left > 0:
                    lease.left -= 1
                    lease.used += 1
                    return
                size = min(cap, lease.size * 2)
            elif lease is not None:
                # Expired: ask for what the last second needed.
                size = min(cap, max(1, lease.used))
            else:
                size = 1
        granted = self._store.hit_rate(key, limit=limit, window_seconds=window_seconds, now=now, count=size)
        with self._lock:
            current = self._leases.get(key)
            if current is not None and current.until > instant and current.left > 0:
                # Another request of this process leased meanwhile: keep both leases' requests.
                current.left += granted - 1
                current.used += 1
                current.size = max(current.size, size)
                return
            self._make_room(instant)
            self._leases[key] = _Lease(left=granted - 1, size=size, used=1, until=instant + LEASE_SECONDS)

    def _make_room(self, instant: float) -> None:
        if len(self._leases) < self._capacity:
            return
        for stale in [key for key, lease in self._leases.items() if lease.until <= instant]:
            del self._leases[stale]
        while len(self._leases) >= self._capacity:
            del self._leases[next(iter(self._leases))]

    def __len__(self) -> int:
        """How many callers hold a lease (live or expired but not yet dropped)."""
        return len(self._leases)
