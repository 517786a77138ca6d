"""The last good value of a file or directory that is reloaded when it changes, shared by every hot reload.

The pinned trust, the access policy and the result keys are each read from files an operator may edit while the
service runs. All three reload the same way, implemented once here: at most once per interval a caller takes a
cheap fingerprint of the files; when it changed, the content is loaded in full and replaces the old value in one
assignment (a caller sees the old value or the new one, never a mixture). Content that fails to load leaves the
last good value in use, is reported once per broken content and counted on every attempt. A forced check (SIGHUP)
loads whether or not the fingerprint changed. One thread checks; the others go on with the value in use instead
of queueing behind a load. What is logged and counted is the owner's, through the hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from attest_service.errors import ConfigurationError

F = TypeVar("F")
V = TypeVar("V")


class LastGood(Generic[F, V]):
    """The value in use (``V``), loaded from content whose fingerprint (``F``) is checked every interval.

    Hooks, called with the check's lock held:

    - ``fingerprint()`` takes the content's fingerprint; a ConfigurationError is a failure with no fingerprint.
    - ``load()`` loads the content in full; a ConfigurationError is a failure of that fingerprint.
    - ``loaded(value, fingerprint)`` runs after a loaded value replaced the old one.
    - ``recovered()`` runs when a failing content went back to the content in use (nothing is loaded).
    - ``failed(exc, fingerprint, first_time)`` runs at each failure; ``first_time`` is False when the same
      broken content failed just before, so that it is reported once and counted every time.
    - ``screen(fingerprint)``, optional, runs before the fingerprint is compared: False ends the check without
      a load (the hook reports why itself, through :meth:`fail`).
    - ``unreadable(exc)``, optional, runs after the failure of a fingerprint that could not be taken.

    ``value`` and ``fingerprint`` are the starting value and the fingerprint of its content (None: no content
    matches, so the first good content found is loaded). The owner reports a failed first load with :meth:`fail`.
    """

    def __init__(self, value: V, fingerprint: F | None, *, interval_seconds: float, clock: Callable[[], float],
                 fingerprint_of: Callable[[], F], load: Callable[[], V], loaded: Callable[[V, F], None],
                 recovered: Callable[[], None], failed: Callable[[ConfigurationError, F | None, bool], None],
                 screen: Callable[[F], bool] | None = None,
                 unreadable: Callable[[ConfigurationError], None] | None = None) -> None:
        self._value = value
        self._fingerprint: F | None = fingerprint
        self._interval = interval_seconds
        self._clock = clock
        self._fingerprint_of = fingerprint_of
        self._load = load
        self._loaded = loaded
        self._recovered = recovered
        self._failed_hook = failed
        self._screen = screen
        self._unreadable = unreadable
        self._failing = False
        self._failed: F | None = None
        self._requested = False
        self._next_check = clock() + interval_seconds
        #: Held while a check runs; an owner holds it to swap the value outside a check (:meth:`replace`).
        self.lock = threading.Lock()

    @property
    def value(self) -> V:
        """The value in use, without checking."""
        return self._value

    @property
    def fingerprint(self) -> F | None:
        """The fingerprint of the content the value in use came from (None: matches no content)."""
        return self._fingerprint

    @property
    def failing(self) -> bool:
        """True while the current content cannot be loaded (the last good value is in use)."""
        return self._failing

    @property
    def failed_fingerprint(self) -> F | None:
        """The fingerprint of the content that failed last, while failing."""
        return self._failed

    def request_reload(self) -> None:
        """Load on the next :meth:`current`, changed or not (SIGHUP); only sets a flag, so signal-handler safe."""
        self._requested = True

    def replace(self, value: V, fingerprint: F | None) -> None:
        """Put ``value`` in use in one assignment (from a hook, or with :attr:`lock` held)."""
        self._value, self._fingerprint = value, fingerprint

    def current(self) -> V:
        """The value in use, after checking the content if the interval passed or a check was requested."""
        if self._requested or self._clock() >= self._next_check:
            self._maybe_check()
        return self._value

    def fail(self, exc: ConfigurationError, fingerprint: F | None) -> None:
        """Record a failure of the content of ``fingerprint``; the last good value stays in use."""
        first_time = not self._failing or fingerprint != self._failed
        self._failing = True
        self._failed = fingerprint
        self._failed_hook(exc, fingerprint, first_time)

    def _maybe_check(self) -> None:
        if not self.lock.acquire(blocking=False):
            return
        try:
            forced = self._requested
            if not forced and self._clock() < self._next_check:
                return
            self._requested = False
            self._check(forced=forced)
            self._next_check = self._clock() + self._interval
        finally:
            self.lock.release()

    def _check(self, *, forced: bool) -> None:
        try:
            # Taken before the load: a change made during the load shows at the next check.
            seen = self._fingerprint_of()
        except ConfigurationError as exc:
            self.fail(exc, None)
            if self._unreadable is not None:
                self._unreadable(exc)
            return
        if self._screen is not None and not self._screen(seen):
            return
        if not forced and seen == self._fingerprint:
            if self._failing:
                # Back to the content in use (a broken edit was undone): nothing to load.
                self._failing = False
                self._failed = None
                self._recovered()
            return
        if not forced and self._failing and seen == self._failed:
            return
        try:
            value = self._load()
        except ConfigurationError as exc:
            self.fail(exc, seen)
            return
        self.replace(value, seen)  # the one assignment that swaps the value
        self._failing = False
        self._failed = None
        self._loaded(value, seen)
