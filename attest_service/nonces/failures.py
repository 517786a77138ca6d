"""Counting the nonce store's failures: one place that sees a StoreUnavailable go by and reports it."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from attest_service.errors import StoreUnavailable


class StoreErrorEvents(Protocol):
    """Where failed store operations are reported (the REST service counts them as a metric)."""

    def store_error(self, operation: str) -> None:
        """The store failed during ``operation`` (``accept``, ``issue_challenge``, ``hit_rate``, ``ping``)."""
        ...


class store_errors_reported:  # noqa: N801 - used as a function: ``with store_errors_reported(events, "ping"):``
    """Report a StoreUnavailable raised inside to ``events`` as a failure of ``operation``, and let it go on.

    A class rather than a generator-based context manager: it wraps store calls made for every request.
    """

    __slots__ = ("_events", "_operation")

    def __init__(self, events: StoreErrorEvents, operation: str) -> None:
        self._events = events
        self._operation = operation

    def __enter__(self) -> None:
        """Nothing to do on the way in."""

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Report a StoreUnavailable; never swallows an exception."""
        if kind is not None and issubclass(kind, StoreUnavailable):
            self._events.store_error(self._operation)
