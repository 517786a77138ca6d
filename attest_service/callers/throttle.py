"""Failed authentication, throttled per source, so that API keys cannot be guessed online at speed.

Each 401 a source gets is counted in the nonce store's rate limiter under a key of its own
(``ATTEST_AUTH_FAILURES_PER_MINUTE`` per minute, shared by every worker and replica). Once the store
refuses one more, the source is answered 429 *before its key is looked at*, until the refusal's
Retry-After has passed: were keys still checked, a right guess would answer differently from a wrong one
and the guessing would go on. The store's limiter can only count, not be asked, so that block is kept in
each process, in a bounded table; a source blocked by one worker can make one more attempt at each other
worker before it is blocked there too.
"""

from __future__ import annotations

import math
import threading
from datetime import datetime, timedelta
from typing import Final

from attest_service.errors import RateLimited

#: Sources blocked at once in one process. Past it, expired entries go first, then the oldest: a flood of
#: distinct sources can only shorten blocks, never grow memory.
MAX_BLOCKED_SOURCES: Final = 10_000
#: The store key under which a source's failed authentications are counted (a client id cannot start
#: with "-", so it cannot collide with a client's own budget).
FAILED_AUTH_PREFIX: Final = "-unauthorized@"


class FailedAuthBlocks:
    """Sources answered 429 for failed authentication, each until an instant; safe between threads."""

    def __init__(self, capacity: int = MAX_BLOCKED_SOURCES) -> None:
        self._capacity = capacity
        self._until: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def check(self, source: str, now: datetime) -> None:
        """Raise :class:`RateLimited` while ``source`` is blocked at ``now``."""
        until = self._until.get(source)
        if until is None:
            return
        if now < until:
            raise RateLimited("too many failed authentications from this source",
                              retry_after=max(1, math.ceil((until - now).total_seconds())))
        with self._lock:
            if self._until.get(source) == until:
                del self._until[source]

    def block(self, source: str, now: datetime, retry_after: int) -> None:
        """Block ``source`` from ``now`` for ``retry_after`` seconds."""
        with self._lock:
            self._until.pop(source, None)
            if len(self._until) >= self._capacity:
                for stale in [key for key, until in self._until.items() if until <= now]:
                    del self._until[stale]
            while len(self._until) >= self._capacity:
                del self._until[next(iter(self._until))]
            self._until[source] = now + timedelta(seconds=retry_after)

    def __len__(self) -> int:
        """How many sources are remembered (blocked or expired but not yet dropped)."""
        return len(self._until)
