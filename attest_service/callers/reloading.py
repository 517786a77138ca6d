"""The access policy of a worker, reloaded when the policy file changes, the way the pinned trust is.

The policy file used to be read once per worker. After an edit (a ``helm upgrade`` that changed the policy
ConfigMap, whose volume the kubelet updates in place), the workers that were running kept the old policy and
only workers started later took the new one: two workers of one pod could answer the same caller
differently, for as long as the pod lived. A :class:`ReloadingPolicy` checks the file at most once per
``ATTEST_TRUST_RELOAD_SECONDS`` (the interval of the pinned trust, :mod:`attest_service.trust.reload`), on a
request, with the same kind of fingerprint: the metadata of the file, read through symbolic links, so that the
symlink swap of a ConfigMap volume, ``os.replace`` and in-place writes are all seen. When it changed, the file
is loaded in full and the new policy replaces the old in one assignment: a request sees one policy or the
other. Every worker does this on its own clock, so all workers of a pod serve the new policy within one
interval of the change. SIGHUP asks for a check on the next request, as it does for the trust.

A file that does not load leaves the last good policy in force (a broken edit must not lock every caller out,
nor open the service), is logged once per broken content, counts ``attest_policy_reload_total{result="failure"}``
and raises ``attest_policy_reload_failing`` until a later load succeeds.

Without a policy file there is nothing to reload: keys and the open mode are settings, read at start-up.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client import Counter, Gauge

from attest_service.callers.policy import AccessPolicy
from attest_service.errors import ConfigurationError
from attest_service.reloading import LastGood

LOG: Final = logging.getLogger(__name__)

POLICY_RELOADS: Final = Counter("attest_policy_reload",
                                "Loads of a changed policy file, by result (success, failure).", ["result"])
POLICY_RELOAD_FAILING: Final = Gauge("attest_policy_reload_failing",
                                     "1 while the policy file cannot be loaded and the last good policy is in use.",
                                     multiprocess_mode="livemax")

#: What :func:`policy_fingerprint` returns: the resolved path and the file's metadata, or why it has none.
PolicyFingerprint = tuple[str, int, int, int, int, int, int]


def policy_fingerprint(path: Path) -> PolicyFingerprint:
    """The file's resolved path, type, size, device, inode, modification and change time (through links).

    A missing or unreadable file has a fingerprint too (its error), so that it reads as a change and the
    load that follows reports it.
    """
    try:
        info = path.stat()
        resolved = str(path.resolve())
    except OSError as exc:
        return (f"unreadable: {exc.strerror}", -1, -1, -1, -1, -1, -1)
    return (resolved, stat.S_IFMT(info.st_mode), info.st_size, info.st_dev, info.st_ino, info.st_mtime_ns,
            info.st_ctime_ns)


class ReloadingPolicy:
    """The access policy in force, reloaded from ``path`` when the file changes (see the module docstring).

    ``load`` reads and validates the file (raising ConfigurationError). The first load happens in the
    constructor: its error propagates unless ``fallback`` (the policy the gunicorn master loaded last) is
    given, which is then served as after a failed reload. ``current()`` is safe to call from many threads.
    """

    def __init__(self, load: Callable[[], AccessPolicy], path: Path | None, *, interval_seconds: float,
                 fallback: AccessPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_seconds <= 0:
            raise ConfigurationError("the policy reload interval must be positive")
        self._path = path
        seen = policy_fingerprint(path) if path is not None else None
        for result in ("success", "failure"):
            # Both series exist from the start, so that rate() and increase() see a zero, not nothing.
            POLICY_RELOADS.labels(result=result)
        POLICY_RELOAD_FAILING.set(0)
        boot_failure: ConfigurationError | None = None
        try:
            policy, fingerprint = load(), seen
        except ConfigurationError as exc:
            if fallback is None:
                raise
            policy, fingerprint = fallback, None
            boot_failure = exc
        # Without a file the fingerprint is never taken: current() does not check.
        self._state: LastGood[PolicyFingerprint, AccessPolicy] = LastGood(
            policy, fingerprint, interval_seconds=interval_seconds, clock=clock,
            fingerprint_of=lambda: policy_fingerprint(path) if path is not None else ("", 0, 0, 0, 0, 0, 0),
            load=load, loaded=self._reloaded, recovered=self._succeeded, failed=self._fail)
        if boot_failure is not None:
            self._state.fail(boot_failure, seen)

    @property
    def failing(self) -> bool:
        """True while the policy file's current content cannot be loaded."""
        return self._state.failing

    def request_reload(self) -> None:
        """Check the file on the next request whatever the interval (SIGHUP); only sets a flag."""
        self._state.request_reload()

    def current(self) -> AccessPolicy:
        """The policy in force, after reloading the file if the interval passed and it changed."""
        if self._path is None:
            return self._state.value
        return self._state.current()

    def _reloaded(self, _policy: AccessPolicy, _seen: PolicyFingerprint) -> None:
        self._succeeded()
        LOG.info("policy file %s reloaded", self._path)

    def _succeeded(self) -> None:
        POLICY_RELOADS.labels(result="success").inc()
        POLICY_RELOAD_FAILING.set(0)

    def _fail(self, exc: ConfigurationError, _seen: PolicyFingerprint | None, first_time: bool) -> None:
        # Logged once per broken content, not once per interval; counted on every attempt.
        if first_time:
            LOG.error("policy file is unusable, keeping the last good policy in force: %s", exc.message)
        POLICY_RELOADS.labels(result="failure").inc()
        POLICY_RELOAD_FAILING.set(1)
