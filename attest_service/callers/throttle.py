"""Failed authentication, throttled per source, so that API keys cannot be guessed online at speed.

Each 401 a source gets is counted in the nonce store's rate limiter under a key of its own
(``ATTEST_AUTH_FAILURES_PER_MINUTE`` per minute, shared by every worker and replica). Once the store
refuses one more, the source is blocked until the refusal's Retry-After: every request from it is answered
429 *before its key is looked at*, a right key as a wrong one. Were keys still checked, a right guess would
answer differently from a wrong one and the 429 would be an oracle that costs the guesser nothing.

The store's limiter can only count, not be asked, and asking it on every request would cost every caller a
round trip; so the blocks are kept in memory shared by the gunicorn master and its workers (an anonymous
shared mapping made before the fork, as :mod:`attest_service.server.workers` does for its connection counts):
a source blocked by one worker is blocked by all the workers of that instance. Another replica learns of
the block at the source's next failed authentication there, when the store refuses it.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from datetime import datetime
from typing import Final

from attest_service.errors import RateLimited

#: Sources blocked at once in one instance (slots of the shared table). Past it, a new block takes the place
#: of the one ending soonest among the slots it may use: a flood of distinct sources can only shorten
#: blocks, never grow memory.
MAX_BLOCKED_SOURCES: Final = 16_384
#: Slots a source may occupy, from the one its hash names onwards (open addressing).
_PROBES: Final = 8
#: The store key under which a source's failed authentications are counted (a client id cannot start
#: with "-", so it cannot collide with a client's own budget).
FAILED_AUTH_PREFIX: Final = "-unauthorized@"
#: The message of every answer to a blocked source.
BLOCKED_MESSAGE: Final = "too many failed authentications from this source"


def _epoch_ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)


class FailedAuthBlocks:
    """Sources answered 429 for failed authentication, each until an instant.

    Kept in a table of ``capacity`` slots in anonymous shared memory, so that the processes forked after it
    was made (gunicorn's workers) share it. Each slot holds two signed 64-bit integers: a keyed hash of the
    source (0: free) and the end of its block in milliseconds since the epoch. Aligned 8-byte reads and
    writes are whole on the platforms gunicorn runs on; a writer clears a slot's hash before it writes the
    end and publishes the hash last, so a reader never takes one source's end for another's.
    """

    def __init__(self, capacity: int = MAX_BLOCKED_SOURCES) -> None:
        self._slots = max(capacity, 1)
        self._memory = mmap.mmap(-1, self._slots * 16)  # MAP_SHARED | MAP_ANONYMOUS
        self._values = memoryview(self._memory).cast("q")
        # The hash key is made once, here, and inherited by the forked workers: every process of the
        # instance finds a source in the same slots, and nobody outside can aim sources at one slot.
        self._key = os.urandom(16)

    def _hash(self, source: str) -> int:
        digest = hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=8, key=self._key).digest()
        return (int.from_bytes(digest, "big") >> 1) | 1  # positive and never 0 (a free slot)

    def _candidates(self, hashed: int) -> range:
        first = hashed % self._slots
        return range(first, first + min(_PROBES, self._slots))

    def check(self, source: str, now: datetime) -> None:
        """Raise :class:`RateLimited` while ``source`` is blocked at ``now``."""
        hashed = self._hash(source)
        values = self._values
        for index in self._candidates(hashed):
            slot = 2 * (index % self._slots)
            if values[slot] == hashed:
                remaining_ms = values[slot + 1] - _epoch_ms(now)
                if remaining_ms > 0:
                    raise RateLimited(BLOCKED_MESSAGE, retry_after=max(1, math.ceil(remaining_ms / 1000)))
                return

    def block(self, source: str, now: datetime, retry_after: int) -> None:
        """Block ``source`` from ``now`` for ``retry_after`` seconds."""
        hashed = self._hash(source)
        now_ms = _epoch_ms(now)
        values = self._values
        chosen: int | None = None
        soonest: tuple[int, int] | None = None
        for index in self._candidates(hashed):
            slot = 2 * (index % self._slots)
            if values[slot] == hashed:
                chosen = slot
                break
            if chosen is None and (values[slot] == 0 or values[slot + 1] <= now_ms):
                chosen = slot
            if soonest is None or values[slot + 1] < soonest[0]:
                soonest = (values[slot + 1], slot)
        if chosen is None:
            assert soonest is not None  # noqa: S101 - there is at least one candidate slot
            chosen = soonest[1]
        values[chosen] = 0
        values[chosen + 1] = now_ms + retry_after * 1000
        values[chosen] = hashed

    def blocked_count(self, now: datetime) -> int:
        """How many sources are blocked at ``now``."""
        now_ms = _epoch_ms(now)
        values = self._values
        return sum(1 for slot in range(0, 2 * self._slots, 2) if values[slot] and values[slot + 1] > now_ms)


#: The table of this instance, made on import: in the gunicorn master, which imports this module with the
#: worker class, before it forks the workers that share it.
SHARED_BLOCKS: Final = FailedAuthBlocks()
