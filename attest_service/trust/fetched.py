"""Issuing CAs pinned by fingerprint, fetched in the background whether or not the AIA fallback is on.

A fingerprint pin (``<cloud>/intermediates/fingerprints.txt``) names the exact bytes of a CA whose file is not
in the directory: Azure China's issuing CAs are pinned so, because Microsoft publishes their fingerprints and
URLs but no copy of them ships here. Fetching those bytes from the allow-listed URL the pin names cannot widen
trust: a certificate whose digest is not the pinned one is never used. So, with the general AIA fallback off
(the default), :class:`PinnedCaFetcher` still fetches them, off the request path:

- at start and after every load of the pinned directory, in a background thread (a greenlet under gevent),
  it fetches each pin with a URL whose certificate it does not hold yet, through
  :class:`~attest_service.trust.issuers.CertificateFetcher` (the AIA rules: the cloud's allow-list, public
  addresses only, one bounded GET, no redirect);
- a fetched certificate is used only when its digest is the pin's and it passes the rules every fetched CA
  must (:func:`~attest_service.trust.issuers.accept_issuing_ca`: not removed, an intermediate CA, chaining to
  a pinned root of the cloud); this is checked again against every trust it joins, so a reload that removes
  the pin, its root or lists it in ``removed.txt`` drops it at once;
- the budget is the AIA fallback's: at most :data:`~attest_service.trust.aia.FETCH_BURST` fetches per round,
  and a URL that failed is not asked again for :data:`~attest_service.trust.aia.NEGATIVE_TTL_SECONDS`;
- with a cache directory (the embedded store's: ``fetched-cas/`` beside the SQLite file) each accepted
  certificate is kept on disk, so a restart needs no network; a file there is held to the same rules as a
  fetched one (its digest must be a current pin's), so a file put there by anyone else is never used.

A pin without a URL (Microsoft publishes only a SHA-1 thumbprint for one China CA) has no address of its own.
When a document is refused because its issuer is not pinned, the signer's first caIssuers URL on the cloud's
allow-list is offered (:meth:`PinnedCaFetcher.offer`): while some URL-less pin of that cloud is not held, the
URL is fetched in the background, never on the request path, and the answer is kept only when it is the
certificate a URL-less pin names. That document stays refused; the ones after it verify. Forged documents
can name any allowed URL, so offers spend a budget of their own per cloud (:data:`OFFER_BURST` fetches,
refilled at :data:`OFFERS_PER_MINUTE` a minute) and a URL is offered at most once per
:data:`RETRY_SECONDS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.errors import ConfigurationError
from attest_service.files import read_bounded
from attest_service.logsafe import loggable
from attest_service.trust.issuers import (
    MAX_FETCH_BYTES,
    AiaPolicy,
    CertificateFetcher,
    FetchRefused,
    accept_issuing_ca,
)
from attest_service.trust.loading import load_certificates
from attest_service.verify import CloudTrust, FingerprintPin, PinnedCertificate, TrustStore, digests, fingerprint

LOG: Final = logging.getLogger(__name__)

#: Directory beside the embedded store's SQLite file that keeps fetched CAs across restarts.
CACHE_DIR_NAME: Final = "fetched-cas"
#: Prefix of the ``source`` of a CA this module added to a trust (``fetched:<url>``).
FETCHED_SOURCE: Final = "fetched:"
#: Fetches one round may start (the AIA fallback's burst).
FETCHES_PER_ROUND: Final = 10
#: Seconds a URL that failed is not asked again (the AIA fallback's negative TTL).
RETRY_SECONDS: Final = 300.0
#: Files of the cache directory looked at; a deployment pins a handful of CAs by fingerprint.
MAX_CACHE_FILES: Final = 64
#: Offered URLs a cloud may have fetched at once (the AIA fallback's burst), and the refill a minute.
OFFER_BURST: Final = 10
OFFERS_PER_MINUTE: Final = 10.0
#: Offered URLs remembered (oldest forgotten first); the allow-list keeps the genuine ones to a handful.
MAX_OFFERED_URLS: Final = 256

FetchState = Literal["fetched", "pending", "failed", "no_url"]
_CACHE_FILE: Final = re.compile(r"[a-z]+-[0-9a-f]{64}\.pem")


def _nothing() -> None:
    """The change callback before the first round."""


def cache_dir_for_store(store_url: str) -> Path | None:
    """``fetched-cas/`` beside the SQLite file of an embedded-store URL; None for a shared store (Redis)."""
    if not store_url.startswith("sqlite:///"):
        return None
    return Path(store_url.removeprefix("sqlite:///")).parent / CACHE_DIR_NAME


@dataclass(frozen=True, slots=True, kw_only=True)
class PinFetch:
    """Whether the certificate of one fingerprint pin is held, for ``certs list`` and the metrics."""

    pin: FingerprintPin
    state: FetchState
    #: SHA-256 of the certificate held (``fetched``), else None.
    sha256: str | None = None
    #: Why the last attempt failed (``failed``), else empty.
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Held:
    certificate: x509.Certificate
    url: str


def _key(pin: FingerprintPin) -> tuple[str, str]:
    return (pin.cloud, pin.digest)


def _pinned_files(trust: CloudTrust) -> set[str]:
    return {digest for pin in trust.intermediates if not pin.source.startswith(FETCHED_SOURCE)
            for digest in digests(pin.certificate)}


class PinnedCaFetcher:
    """Holds the CAs that fingerprint pins name, fetched in the background (see the module docstring).

    ``fetcher`` defaults to public addresses only; tests pass one that reaches a server on loopback, and a
    ``policy`` whose allow-list names it, as the AIA tests do. Neither is read from a setting. Safe to call
    from many threads (and greenlets).
    """

    def __init__(self, *, policy: AiaPolicy | None = None, fetcher: CertificateFetcher | None = None,
                 cache_dir: Path | None = None, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy if policy is not None else AiaPolicy.azure()
        self.cache_dir = cache_dir
        self._fetcher = fetcher if fetcher is not None else CertificateFetcher()
        self._retry = retry_seconds
        self._clock = clock
        self._held: dict[tuple[str, str], _Held] = {}
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._round: threading.Thread | None = None
        self._pending_trust: TrustStore | None = None
        self._on_change: Callable[[], None] = _nothing
        self._again = False
        self._idle = threading.Event()
        self._idle.set()
        self._cache_read = False
        self._offered: list[tuple[str, str]] = []
        self._offered_at: dict[str, float] = {}
        self._tokens: dict[str, tuple[float, float]] = {}

    # --- what the trust in use gets -------------------------------------------------------------

    def augment(self, trust: TrustStore, *, now: datetime | None = None) -> TrustStore:
        """``trust`` with the held CAs its fingerprint pins name added as intermediates of their cloud.

        Each is checked against ``trust`` (its pin still there, not removed, chaining to a root of the cloud);
        a CA added to an earlier trust by this method is replaced, not kept.
        """
        instant = now if now is not None else datetime.now(UTC)
        clouds = dict(trust.clouds)
        changed = False
        for name, cloud_trust in trust.clouds.items():
            base = tuple(pin for pin in cloud_trust.intermediates if not pin.source.startswith(FETCHED_SOURCE))
            added = tuple(self._accepted(cloud_trust, base, instant))
            if added or len(base) != len(cloud_trust.intermediates):
                clouds[name] = replace(cloud_trust, intermediates=(*base, *added))
                changed = True
        return TrustStore(clouds=MappingProxyType(clouds), directory=trust.directory) if changed else trust

    def _accepted(self, trust: CloudTrust, base: tuple[PinnedCertificate, ...],
                  now: datetime) -> Iterable[PinnedCertificate]:
        pinned = _pinned_files(trust)
        with self._lock:
            held = [(pin, self._held.get(_key(pin))) for pin in trust.fingerprint_pins]
        for pin, found in held:
            if found is None or pin.digest in pinned or not pin.matches(found.certificate):
                continue
            try:
                accept_issuing_ca(found.certificate, replace(trust, intermediates=base), policy=self.policy, now=now)
            except FetchRefused as exc:
                LOG.warning("fetched CA of fingerprint pin %s (%s) is not used: %s", pin.name, pin.cloud,
                            loggable(exc.message, 400))
                continue
            yield PinnedCertificate(cloud=pin.cloud, role="intermediate", certificate=found.certificate,
                                    source=f"{FETCHED_SOURCE}{found.url}")

    def states(self, trust: TrustStore) -> list[PinFetch]:
        """Every fingerprint pin of ``trust`` with whether its certificate is held."""
        found: list[PinFetch] = []
        with self._lock:
            for cloud_trust in trust.clouds.values():
                for pin in cloud_trust.fingerprint_pins:
                    held = self._held.get(_key(pin))
                    failed = self._failed.get(_key(pin))
                    if held is not None:
                        found.append(PinFetch(pin=pin, state="fetched", sha256=fingerprint(held.certificate)))
                    elif pin.url is None:
                        found.append(PinFetch(pin=pin, state="no_url"))
                    elif failed is not None:
                        found.append(PinFetch(pin=pin, state="failed", detail=failed[1]))
                    else:
                        found.append(PinFetch(pin=pin, state="pending"))
        return found

    # --- fetching -------------------------------------------------------------------------------

    def refresh(self, trust: TrustStore, on_change: Callable[[], None]) -> None:
        """Fetch, in the background, the pins of ``trust`` whose certificate is not held; ``on_change`` after.

        ``on_change`` is called from the background thread once a round added a CA. A round already running
        runs once more with the newest trust instead of starting a second one.
        """
        with self._lock:
            self._pending_trust = trust
            self._on_change = on_change
            if self._round is not None and self._round.is_alive():
                self._again = True
                return
            self._idle.clear()
            self._round = threading.Thread(target=self._run, name="fingerprint-pin-fetch", daemon=True)
            self._round.start()

    def offer(self, trust: CloudTrust, ca_issuers: Sequence[str]) -> bool:
        """Queue the first allowed of a refused document's caIssuers URLs for the URL-less pins of its cloud.

        True when a fetch was queued (the caller then starts a round with :meth:`refresh`). Nothing is queued
        when every URL-less pin is held, no URL is allowed, the URL was offered within :data:`RETRY_SECONDS`,
        or the cloud's offer budget is spent.
        """
        cloud = trust.profile.name
        pinned = _pinned_files(trust)
        url = next((url for url in ca_issuers if self.policy.allowed(cloud, url)), None)
        if url is None:
            return False
        with self._lock:
            waiting = [pin for pin in trust.fingerprint_pins
                       if pin.url is None and _key(pin) not in self._held and pin.digest not in pinned]
            moment = self._clock()
            if not waiting or self._offered_at.get(url, float("-inf")) > moment:
                return False
            tokens, updated = self._tokens.get(cloud, (float(OFFER_BURST), moment))
            tokens = min(float(OFFER_BURST), tokens + (moment - updated) * OFFERS_PER_MINUTE / 60.0)
            if tokens < 1.0:
                self._tokens[cloud] = (tokens, moment)
                return False
            self._tokens[cloud] = (tokens - 1.0, moment)
            self._offered_at.pop(url, None)
            while len(self._offered_at) >= MAX_OFFERED_URLS:
                del self._offered_at[next(iter(self._offered_at))]
            self._offered_at[url] = moment + self._retry
            self._offered.append((cloud, url))
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no round runs; True when none does (for tests and an orderly shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                trust, on_change = self._pending_trust, self._on_change
                self._again = False
            try:
                if trust is not None and self._round_of(trust):
                    on_change()
            except Exception:
                # A bug here must not kill the worker: the pins are then not fetched, and say so.
                LOG.exception("fetching the CAs pinned by fingerprint failed")
            with self._lock:
                if not self._again:
                    self._round = None
                    self._idle.set()
                    return

    def _round_of(self, trust: TrustStore) -> bool:
        """One round: the cache directory first, then the network. True when a CA was added."""
        added = False
        if not self._cache_read:
            self._cache_read = True
            added = self.read_cache(trust)
        started = 0
        for cloud_trust in trust.clouds.values():
            pinned = _pinned_files(cloud_trust)
            for pin in cloud_trust.fingerprint_pins:
                if pin.url is None or pin.digest in pinned or pin.digest in cloud_trust.removed:
                    continue
                with self._lock:
                    if _key(pin) in self._held:
                        continue
                    failed = self._failed.get(_key(pin))
                    if failed is not None and failed[0] > self._clock():
                        continue
                if started >= FETCHES_PER_ROUND:
                    LOG.warning("fingerprint pins: more than %d to fetch; the rest wait for the next round",
                                FETCHES_PER_ROUND)
                    return added
                started += 1
                added = self._fetch(pin, pin.url, cloud_trust) or added
        with self._lock:
            offered, self._offered = self._offered, []
        for cloud, url in offered:
            offered_trust = trust.clouds.get(cloud)
            if offered_trust is not None:
                added = self._fetch_offered(url, offered_trust) or added
        return added

    def _fetch_offered(self, url: str, trust: CloudTrust) -> bool:
        """Fetch an offered URL; keep the answer only as the certificate of a URL-less pin it matches."""
        with self._lock:
            waiting = [pin for pin in trust.fingerprint_pins if pin.url is None and _key(pin) not in self._held]
        if not waiting:
            return False
        try:
            pin, certificate = self._matching(url, waiting, trust)
        except FetchRefused as exc:
            # The URL is a refused document's, and the message may quote it: both are the sender's text.
            LOG.warning("fingerprint pins (%s): %s offered by a refused document: not used: %s: %s",
                        trust.profile.name, loggable(url), exc.result, loggable(exc.message, 400))
            return False
        with self._lock:
            self._held[_key(pin)] = _Held(certificate, url)
        LOG.info("fingerprint pin %s (%s): fetched %s (sha256 %s) from %s, named by a refused document",
                 pin.name, pin.cloud, loggable(certificate.subject.rfc4514_string()), fingerprint(certificate),
                 loggable(url))
        self._write_cache(pin, certificate)
        return True

    def _fetch(self, pin: FingerprintPin, url: str, trust: CloudTrust) -> bool:
        try:
            certificate = self._fetch_checked(pin, url, trust)
        except FetchRefused as exc:
            with self._lock:
                self._failed[_key(pin)] = (self._clock() + self._retry, f"{exc.result}: {exc.message}")
            LOG.warning("fingerprint pin %s (%s): not fetched from %s: %s: %s", pin.name, pin.cloud, loggable(url),
                        exc.result, loggable(exc.message, 400))
            return False
        with self._lock:
            self._held[_key(pin)] = _Held(certificate, url)
            self._failed.pop(_key(pin), None)
        LOG.info("fingerprint pin %s (%s): fetched %s (sha256 %s) from %s", pin.name, pin.cloud,
                 loggable(certificate.subject.rfc4514_string()), fingerprint(certificate), loggable(url))
        self._write_cache(pin, certificate)
        return True

    def _matching(self, url: str, waiting: Sequence[FingerprintPin],
                  trust: CloudTrust) -> tuple[FingerprintPin, x509.Certificate]:
        """The certificate at ``url`` and the pin of ``waiting`` it is; FetchRefused when it is none of them."""
        if not self.policy.allowed(trust.profile.name, url):
            raise FetchRefused("not_allowed", f"{url[:200]} is not on the {trust.profile.name} AIA allow-list")
        certificate = self._fetcher.fetch(url)
        pin = next((pin for pin in waiting if pin.matches(certificate)), None)
        if pin is None:
            raise FetchRefused("mismatch", f"{fingerprint(certificate)} is not the certificate of a "
                                           f"{trust.profile.name} fingerprint pin without URL")
        self._check(pin, certificate, trust)
        return pin, certificate

    def _fetch_checked(self, pin: FingerprintPin, url: str, trust: CloudTrust) -> x509.Certificate:
        """The certificate at ``url`` if it is the pinned one; FetchRefused otherwise (nothing fetched off-list)."""
        if not self.policy.allowed(pin.cloud, url):
            raise FetchRefused("not_allowed", f"{url[:200]} is not on the {pin.cloud} AIA allow-list")
        certificate = self._fetcher.fetch(url)
        self._check(pin, certificate, trust)
        return certificate

    def _check(self, pin: FingerprintPin, certificate: x509.Certificate, trust: CloudTrust) -> None:
        """Raise FetchRefused unless ``certificate`` is the pinned one and passes the fetched-CA rules now."""
        if not pin.matches(certificate):
            raise FetchRefused("mismatch", f"the certificate answered ({fingerprint(certificate)}) does not have "
                                           f"the pinned {pin.algorithm} {pin.digest}")
        accept_issuing_ca(certificate, trust, policy=self.policy, now=datetime.now(UTC))

    # --- the cache directory ----------------------------------------------------------------------

    def read_cache(self, trust: TrustStore) -> bool:
        """Take the CAs of the cache directory that ``trust``'s pins name (no network); True when one was."""
        directory = self.cache_dir
        if directory is None or not directory.is_dir():
            return False
        added = False
        for path in sorted(directory.iterdir())[:MAX_CACHE_FILES]:
            if not _CACHE_FILE.fullmatch(path.name):
                continue
            cloud = path.name.split("-", 1)[0]
            cloud_trust = trust.clouds.get(cloud)
            if cloud_trust is None:
                continue
            try:
                certificates = load_certificates(read_bounded(path, MAX_FETCH_BYTES, what="fetched CA"),
                                                 origin=str(path))
            except ConfigurationError as exc:
                LOG.warning("fetched CA cache: %s is not used: %s", path, exc.message)
                continue
            for pin in cloud_trust.fingerprint_pins:
                if len(certificates) != 1 or not pin.matches(certificates[0]):
                    continue
                try:
                    self._check(pin, certificates[0], cloud_trust)
                except FetchRefused as exc:
                    LOG.warning("fetched CA cache: %s is not used: %s", path, exc.message)
                    continue
                with self._lock:
                    self._held[_key(pin)] = _Held(certificates[0], pin.url or f"file:{path}")
                added = True
        return added

    def _write_cache(self, pin: FingerprintPin, certificate: x509.Certificate) -> None:
        directory = self.cache_dir
        if directory is None:
            return
        path = directory / f"{pin.cloud}-{fingerprint(certificate)}.pem"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=".fetched-", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(certificate.public_bytes(serialization.Encoding.PEM))
                Path(temporary).replace(path)
            except BaseException:
                with contextlib.suppress(OSError):
                    Path(temporary).unlink()
                raise
        except OSError as exc:
            # The CA is held in memory all the same; only a restart will fetch it again.
            LOG.warning("fetched CA cache: cannot write %s: %s", path, exc.strerror)


def cached_states(trust: TrustStore, cache_dir: Path | None) -> list[PinFetch]:
    """What ``certs list`` shows offline: each fingerprint pin, ``fetched`` when the cache directory holds it.

    Reads the cache directory once, under the same rules as the service (the pinned digest, the fetched-CA
    rules at this instant); nothing is fetched.
    """
    reader = PinnedCaFetcher(cache_dir=cache_dir)
    reader.read_cache(trust)
    return reader.states(trust)
