"""Hot reload of the pinned trust: the verifier a service process uses, over the last good pinned directory.

A change to the mounted pins (a rotation, a removal) takes effect in every worker without a restart, and a
broken change never leaves a worker without trust. The reloads are counted (:mod:`attest_service.trust.metrics`);
a refusal at an unpinned issuer goes through :class:`~attest_service.trust.aia.AiaFallback`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509

from attest_service.errors import CertificateRevoked, ConfigurationError, UntrustedChain
from attest_service.reloading import LastGood
from attest_service.trust import CloudTrust, TrustStore, crl_wanted, load_trust, revocation_metrics
from attest_service.trust.aia import AiaFallback
from attest_service.trust.certificates import ca_issuers_urls
from attest_service.trust.loading import (
    Fingerprint,
    directory_fingerprint,
    read_removed,
    without_removed,
)
from attest_service.trust.metrics import (
    RELOAD_FAILING,
    RELOADS,
    UnpinnedIssuers,
    count_verified,
    problems,
    publish,
)
from attest_service.verify import (
    DocumentVerifier,
    VerificationPolicy,
    VerifiedDocument,
)

if TYPE_CHECKING:
    from attest_service.trust.aia import AiaFetcher
    from attest_service.trust.fetched import PinFetch, PinnedCaFetcher

LOG: Final = logging.getLogger(__name__)

def _load(directory: Path) -> TrustStore:
    trust = load_trust(directory)
    if not any(True for _ in trust.all_pins()):
        # An empty mount (a ConfigMap that failed to project) would otherwise silently trust nothing.
        raise ConfigurationError(f"{directory}: no pinned certificate at all")
    _log_problems(trust)
    return trust


def _log_problems(trust: TrustStore) -> None:
    for message in problems(trust):
        LOG.warning("pinned directory %s: %s", trust.directory, message)


class ReloadingVerifier:
    """The current trust of a process, reloaded when the pinned directory changes.

    It owns the current :class:`~attest_service.verify.DocumentVerifier`. At most once per interval
    (``ATTEST_TRUST_RELOAD_SECONDS``) a request checks a cheap fingerprint of the pinned directory
    (:func:`~attest_service.trust.loading.directory_fingerprint`: the metadata of every entry the loader
    reads); when it changed, the directory is loaded in full and the new DocumentVerifier replaces the old
    one in a single assignment, so a request sees the old trust or the new trust, never a mixture. A
    directory that fails to load leaves the last good trust in place, logs the reason, counts
    ``attest_trust_reload_total{result="failure"}`` and raises the ``attest_trust_reload_failing`` gauge
    until a later load succeeds, with one exception: the CAs the directory's ``removed.txt`` files name are
    taken out of it all the same (a removal only narrows the trust, and must not wait for the rest of the
    directory to be fixed).

    ``verifier()`` and ``verify()`` are safe to call from many threads. The first load happens in the
    constructor and raises ConfigurationError: a service must not start without its trust. With
    ``last_good`` (the trust the gunicorn master loaded last, :mod:`attest_service.server.master`), a failed
    first load starts the verifier on that trust instead, failing as after a failed reload.
    """

    def __init__(self, directory: Path, *, interval_seconds: float, aia: AiaFetcher | None = None,
                 clock: Callable[[], float] = time.monotonic, last_good: TrustStore | None = None,
                 pinned_fetch: PinnedCaFetcher | None = None) -> None:
        if interval_seconds <= 0:
            raise ConfigurationError("the trust reload interval must be positive")
        self.directory = directory
        self._pinned_fetch = pinned_fetch
        self._counts = (0, 0)
        seen: Fingerprint | None = None
        boot_failure: ConfigurationError | None = None
        try:
            seen = directory_fingerprint(directory)
            verifier, fingerprint = self._verifier_for(_load(directory)), seen
        except ConfigurationError as exc:
            if last_good is None:
                raise
            # A worker respawned while the directory is broken serves the last good trust rather than not
            # booting (gunicorn halts when a worker cannot boot). No directory's fingerprint is empty
            # (there is an entry per cloud and folder), so the first good content found later is loaded.
            verifier, fingerprint = self._verifier_for(last_good), ()
            boot_failure = exc
        self._state: LastGood[Fingerprint, DocumentVerifier] = LastGood(
            verifier, fingerprint, interval_seconds=interval_seconds, clock=clock,
            fingerprint_of=lambda: directory_fingerprint(directory), load=self._load_verifier,
            loaded=self._reloaded, recovered=self._succeeded, failed=self._fail)
        self._fallback = AiaFallback(aia, UnpinnedIssuers(clock), offer_issuer_url=self._offer_issuer_url)
        RELOAD_FAILING.set(0)
        for result in ("success", "failure"):
            # Both series exist from the start, so that rate() and increase() alerts see a zero, not nothing.
            RELOADS.labels(result=result)
        publish(self)
        if boot_failure is not None:
            self._state.fail(boot_failure, seen)
        self._fetch_pinned()

    # --- reload ---------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask for a full reload on the next request (SIGHUP); only sets a flag, so signal-handler safe.

        The next request reloads whether or not the fingerprint changed. The web application installs the
        handler in each gunicorn worker (``post_worker_init``), because gunicorn resets SIGHUP to its default
        (terminate) in workers::

            signal.signal(signal.SIGHUP, lambda _signum, _frame: verifier.request_reload())

        Sending SIGHUP to the gunicorn *master* instead restarts the workers gracefully, which also reloads.
        """
        self._state.request_reload()

    @property
    def trust(self) -> TrustStore:
        """The trust currently in use."""
        return self._state.value.trust

    @property
    def failing(self) -> bool:
        """True while the directory's current content cannot be loaded."""
        return self._state.failing

    def verifier(self) -> DocumentVerifier:
        """The current DocumentVerifier, after reloading if the interval passed and the directory changed."""
        return self._state.current()

    def _load_verifier(self) -> DocumentVerifier:
        trust = _load(self.directory)
        # Counted here: the verifier's trust also holds the fingerprint-pinned CAs fetched so far.
        self._counts = sum(1 for _ in trust.all_pins()), sum(len(cloud.crls) for cloud in trust.clouds.values())
        return self._verifier_for(trust)

    def _reloaded(self, _verifier: DocumentVerifier, _seen: Fingerprint) -> None:
        self._succeeded()
        self._fetch_pinned()
        LOG.info("pinned trust reloaded from %s: %d certificates, %d CRLs", self.directory, *self._counts)

    # --- CAs pinned by fingerprint, fetched in the background ------------------------------------

    def _verifier_for(self, trust: TrustStore) -> DocumentVerifier:
        """A verifier over ``trust`` plus the fingerprint-pinned CAs fetched so far (checked against it)."""
        return DocumentVerifier(trust if self._pinned_fetch is None else self._pinned_fetch.augment(trust))

    def _fetch_pinned(self) -> None:
        """Fetch, off the request path, the fingerprint-pinned CAs of the trust in use not held yet."""
        if self._pinned_fetch is not None:
            self._pinned_fetch.refresh(self._state.value.trust, self._pinned_fetched)

    def _pinned_fetched(self) -> None:
        # Called from the fetching thread. The lock of the reload check makes this swap and a reload's swap
        # one after the other, so neither undoes the other.
        with self._state.lock:
            self._state.replace(self._verifier_for(self._state.value.trust), self._state.fingerprint)
        publish(self)
        LOG.info("pinned trust of %s: fingerprint-pinned CAs fetched and in use", self.directory)

    def _offer_issuer_url(self, signer: x509.Certificate, cloud_trust: CloudTrust) -> None:
        """Let the background fetcher try the signer's caIssuers URL for the cloud's URL-less fingerprint pins."""
        if self._pinned_fetch is not None and self._pinned_fetch.offer(cloud_trust, ca_issuers_urls(signer)):
            self._fetch_pinned()

    def pinned_fetches(self) -> list[PinFetch]:
        """Each fingerprint pin of the trust in use with whether its certificate is fetched (metrics)."""
        if self._pinned_fetch is None:
            return []
        return self._pinned_fetch.states(self._state.value.trust)

    def _succeeded(self) -> None:
        RELOADS.labels(result="success").inc()
        RELOAD_FAILING.set(0)
        publish(self)

    def _fail(self, exc: ConfigurationError, _seen: Fingerprint | None, first_time: bool) -> None:
        # Logged once per broken content, not once per interval; counted on every attempt.
        if first_time:
            LOG.error("pinned directory %s is unusable, keeping the last good trust: %s", self.directory, exc.message)
        RELOADS.labels(result="failure").inc()
        RELOAD_FAILING.set(1)
        self._apply_removals()

    def _apply_removals(self) -> None:
        """Take every CA the directory's removed lists name now out of the last good trust in use.

        A broken directory keeps the last good trust, but a removal is the one change that must not wait for
        the rest of the directory to be fixed: it only narrows the trust. Removals are never undone here;
        the next load of good content decides.
        """
        current = self._state.value.trust
        narrowed = without_removed(current, read_removed(self.directory))
        if narrowed is current:
            return
        # The empty fingerprint matches no directory: whatever good content comes next is loaded in full,
        # even the very content the last good trust came from.
        self._state.replace(DocumentVerifier(narrowed), ())
        dropped = [f"{pin.cloud}: {pin.subject_cn} (sha256 {pin.sha256})" for cloud in narrowed.clouds.values()
                   for pin in cloud.excluded if pin not in current.for_cloud(pin.cloud).excluded]
        LOG.error("pinned directory %s: applied its removed.txt to the last good trust; no longer trusted: %s",
                  self.directory, "; ".join(dropped) or "no pinned file (the AIA fallback refuses the CAs listed)")
        publish(self)

    # --- verification ---------------------------------------------------------------------------

    def decode(self, response: Mapping[str, object] | str | bytes) -> bytes:
        """The DER of ``response`` (:meth:`DocumentVerifier.decode`, with the current verifier's caches)."""
        return self.verifier().decode(response)

    def verify(self, document: bytes, *, policy: VerificationPolicy, now: datetime) -> VerifiedDocument:
        """Verify with the current trust; on an unpinned issuer, try the AIA fallback when enabled.

        Raises what the core raises; the AIA path raises UntrustedChain when it cannot help.
        """
        verifier = self.verifier()
        try:
            result = verifier.verify(document, policy=policy, now=now)
        except CertificateRevoked as revoked:
            revocation_metrics.log_revoked(revoked)
            raise
        except UntrustedChain as refusal:
            result = self._fallback.verify(verifier, document, policy=policy, now=now, refusal=refusal)
        revocation_metrics.count_unknown(result)
        crl_wanted.note(document, result)
        count_verified(result)
        return result
