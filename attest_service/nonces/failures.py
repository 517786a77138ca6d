"""Counting the nonce store's failures: one place that sees a StoreUnavailable go by and reports it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from attest_service.errors import StoreUnavailable


class StoreErrorEvents(Protocol):
    """Where failed store operations are reported (the REST service counts them as a metric)."""

    def store_error(self, operation: str) -> None:
        """The store failed during ``operation`` (``accept``, ``issue_challenge``, ``hit_rate``, ``ping``)."""
        ...


@contextlib.contextmanager
def store_errors_reported(events: StoreErrorEvents, operation: str) -> Iterator[None]:
    """Report a StoreUnavailable raised inside to ``events`` as a failure of ``operation``, and let it go on."""
    try:
        yield
    except StoreUnavailable:
        events.store_error(operation)
        raise
