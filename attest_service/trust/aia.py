"""Optional AIA fallback: fetch an unpinned issuing CA from the signer's caIssuers URL, under strict rules.

Off by default (the setting ``ATTEST_AIA_FETCH=1`` turns it on). Pinning stays the way to trust a CA; the
fallback only bridges the days between Azure starting to sign with a new issuing CA and the operator
pinning it, and every use of it is logged and counted (``attest_aia_fetch_total{result}``) so that the
operator does pin it.

It is used only after the verification core refused a document with ``untrusted_chain``, which means the
checks that need no network already passed: the signature verifies under the signer the SignerInfo names
and that signer's name is the cloud's metadata domain (steps 4 and 5 of the verifier). Those checks prove
nothing about the sender (anyone can sign a document with a certificate of their own making), so the
fallback treats every document as possibly forged:

1. Which URL may be fetched, how, and what the fetched CA must be are the rules of
   :mod:`attest_service.trust.issuers` (the allow-list, public addresses only, one bounded GET, not removed,
   a CA, pinned by fingerprint or of the cloud's organisation, chaining to a pinned root; China only by
   fingerprint).
2. The caches hold only what depends on the URL: the certificate a URL answered (reused for the positive
   TTL, at most until it expires; for the negative TTL when it failed the CA rules at fetch time) and the
   failures of fetching or parsing (the negative TTL). The CA rules run on every use against the trust in
   use, so a reload that removes a pin or a root takes effect at once; whether the CA issued this
   document's signer is checked per document and never cached. A forged document that names the real new
   CA and its real URL is refused on its own and leaves the URL usable for genuine documents. Each cache
   holds :data:`MAX_CACHE_ENTRIES` URLs and drops the one stored longest ago to make room.
3. Work is bounded: one fetch per URL at a time (later requests for it wait for that answer instead of
   fetching again), and per cloud a token bucket of :data:`FETCH_BURST` fetches refilled at
   :data:`FETCHES_PER_MINUTE` a minute, so forged documents naming ever new allowed paths cost at most that
   many outbound GETs. URLs a fingerprint pin names do not spend the budget (the caches bound them), so a
   flood of forged URLs cannot keep a CA the operator staged from being fetched. No lock is held across
   network I/O: a slow repository delays only the documents waiting for that URL.

A fetched CA is trusted by :class:`~attest_service.trust.reload.ReloadingVerifier` alongside the pins until the
pins reload; after a reload it is taken from this fetcher's cache again, re-checked against the new pins,
without a new fetch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeVar

from cryptography import x509
from prometheus_client import Counter

from attest_service.errors import UntrustedChain
from attest_service.logsafe import loggable
from attest_service.trust.certificates import ca_issuers_urls
from attest_service.trust.issuers import (
    FETCH_TIMEOUT_SECONDS,
    MAX_FETCH_BYTES,
    AddressCheck,
    AiaPolicy,
    AllowRule,
    CertificateFetcher,
    FetchRefused,
    accept_issuing_ca,
    check_issued,
    is_public_address,
)
from attest_service.verify import CloudTrust, PinnedCertificate

__all__ = [
    "FETCHES",
    "FETCHES_PER_MINUTE",
    "FETCH_BURST",
    "FETCH_TIMEOUT_SECONDS",
    "MAX_CACHE_ENTRIES",
    "MAX_FETCH_BYTES",
    "NEGATIVE_TTL_SECONDS",
    "POSITIVE_TTL_SECONDS",
    "AddressCheck",
    "AiaFetcher",
    "AiaPolicy",
    "AllowRule",
    "is_public_address",
]

LOG: Final = logging.getLogger(__name__)

#: How long a fetched CA that passed the CA rules is reused, in seconds (at most until it expires).
POSITIVE_TTL_SECONDS: Final = 3600.0
#: How long a URL whose fetch failed (or whose CA failed the CA rules) is not fetched again, in seconds.
NEGATIVE_TTL_SECONDS: Final = 300.0
#: URLs remembered per cache (the oldest stored is evicted first); the allow-list keeps the real set to a handful.
MAX_CACHE_ENTRIES: Final = 256
#: Outbound fetches a cloud may start at once, per process; a rotation needs one per new CA.
FETCH_BURST: Final = 10
#: Fetches a minute the budget refills with, per cloud and process.
FETCHES_PER_MINUTE: Final = 10.0
#: How long a request waits for another request's fetch of the same URL, in timeouts of one fetch.
_WAIT_FACTOR: Final = 2.0

FETCHES: Final = Counter("attest_aia_fetch",
                         "AIA fallback attempts by result (fetched, cached, negative_cached, rate_limited, "
                         "not_allowed, no_url, unpinned, address_refused, redirect, http_error, too_large, "
                         "invalid, removed, untrusted, not_issuer, network_error).",
                         ["result"])

_V = TypeVar("_V")


def _remember(cache: dict[str, _V], url: str, value: _V) -> None:
    """Store ``value`` for ``url`` as the newest entry, evicting the oldest beyond :data:`MAX_CACHE_ENTRIES`.

    Oldest by insertion (dicts keep it; storing a URL again makes it the newest), so that a flood of new
    URLs pushes out the URLs it outlived one by one, never the answers for the cloud's genuine URLs all at
    once. The fetch budget bounds how fast a flood can add entries at all.
    """
    cache.pop(url, None)
    while len(cache) >= MAX_CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[url] = value


@dataclass(slots=True)
class _Answer:
    """What a URL answered: its certificate (until ``expires``)."""

    certificate: x509.Certificate
    expires: float


@dataclass(slots=True)
class _Failure:
    """A URL that could not be fetched or parsed, until ``expires``."""

    result: str
    message: str
    expires: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class AiaFetcher:
    """Fetches and validates unpinned issuing CAs for the service (see the module docstring for every rule).

    ``allow_address`` decides which resolved addresses may be contacted; it defaults to public addresses
    only and exists as an argument so that tests can reach a server on loopback. It is deliberately not
    read from any setting. Safe to call from many threads (and greenlets).
    """

    def __init__(self, policy: AiaPolicy | None = None, *, allow_address: AddressCheck = is_public_address,
                 timeout_seconds: float = FETCH_TIMEOUT_SECONDS, max_bytes: int = MAX_FETCH_BYTES,
                 positive_ttl_seconds: float = POSITIVE_TTL_SECONDS,
                 negative_ttl_seconds: float = NEGATIVE_TTL_SECONDS,
                 fetch_burst: int = FETCH_BURST, fetches_per_minute: float = FETCHES_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy if policy is not None else AiaPolicy.azure()
        self._fetcher = CertificateFetcher(allow_address=allow_address, timeout_seconds=timeout_seconds,
                                           max_bytes=max_bytes)
        self._timeout = timeout_seconds
        self._positive_ttl = positive_ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._burst = float(fetch_burst)
        self._refill_per_second = fetches_per_minute / 60.0
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        self._failures: dict[str, _Failure] = {}
        self._in_flight: dict[str, threading.Event] = {}
        self._buckets: dict[str, _Bucket] = {}
        # Guards the dictionaries above and nothing else: it is never held across a fetch.
        self._lock = threading.Lock()

    def issuer_for(self, signer: x509.Certificate, trust: CloudTrust, *, now: datetime) -> PinnedCertificate:
        """The signer's issuing CA, obtained and validated for ``trust``'s cloud at ``now``.

        Raises UntrustedChain (with the reason) when no allowed URL yields a CA that passes every rule.
        """
        cloud = trust.profile.name
        url = ""
        try:
            url = self.policy.fetch_url(trust, ca_issuers_urls(signer))
            certificate, how = self._certificate(url, trust)
            # The CA rules look at the CA and the pins only; the signer check comes last, uncached.
            accept_issuing_ca(certificate, trust, policy=self.policy, now=now)
            self._keep(url, certificate, now)
            check_issued(certificate, signer)
        except FetchRefused as exc:
            where = f" from {url[:200]}" if url else ""
            FETCHES.labels(result=exc.result).inc()
            # The URL and the message (which may quote the URL and certificate names) are the sender's text.
            LOG.warning("AIA: %s: %s%s: %s", exc.result, cloud, loggable(where), loggable(exc.message, 400))
            raise UntrustedChain(f"the signer's issuer is not pinned and the AIA fallback did not help{where}: "
                                 f"{exc.message}") from exc
        FETCHES.labels(result=how).inc()
        pin = PinnedCertificate(cloud=cloud, role="intermediate", certificate=certificate, source=f"aia:{url}")
        if how == "fetched":
            LOG.warning("AIA: fetched unpinned issuing CA '%s' (sha256 %s) from %s for %s; pin it: "
                        "attest-service certs add --cloud %s --from-document DOCUMENT",
                        loggable(pin.certificate.subject.rfc4514_string()), pin.sha256, loggable(url), cloud, cloud)
        return pin

    def _certificate(self, url: str, trust: CloudTrust) -> tuple[x509.Certificate, str]:
        """The certificate ``url`` answered, from the cache or fetched now: ``(certificate, "cached"|"fetched")``."""
        cloud = trust.profile.name
        pinned_url = any(pin.url == url for pin in trust.fingerprint_pins)
        for _ in range(2):
            with self._lock:
                moment = self._clock()
                answer = self._answers.get(url)
                if answer is not None and answer.expires > moment:
                    return answer.certificate, "cached"
                failure = self._failures.get(url)
                if failure is not None and failure.expires > moment:
                    raise FetchRefused("negative_cached", f"failed recently ({failure.result}: {failure.message})")
                flight = self._in_flight.get(url)
                if flight is None:
                    if not pinned_url and not self._take_token(cloud, moment):
                        raise FetchRefused("rate_limited", f"the budget of {self._burst:g} fetches (refilled at "
                                                           f"{self._refill_per_second * 60:g} a minute) for {cloud} "
                                                           "is spent")
                    flight = self._in_flight[url] = threading.Event()
                    break
            # Another request is fetching this URL: its answer (or failure) lands in the caches.
            flight.wait(self._timeout * _WAIT_FACTOR)
        else:
            raise FetchRefused("network_error", "another request's fetch of this URL did not finish in time")
        try:
            certificate = self._fetcher.fetch(url)
        except FetchRefused as exc:
            with self._lock:
                _remember(self._failures, url, _Failure(exc.result, exc.message, self._clock() + self._negative_ttl))
                self._in_flight.pop(url, None)
            flight.set()
            raise
        except BaseException:
            with self._lock:
                self._in_flight.pop(url, None)
            flight.set()
            raise
        with self._lock:
            # Kept for the negative TTL until it passes the CA rules (_keep): a URL answering a CA that
            # fails them is fetched again after that, not after an hour.
            _remember(self._answers, url, _Answer(certificate, self._clock() + self._negative_ttl))
            self._failures.pop(url, None)
            self._in_flight.pop(url, None)
        flight.set()
        return certificate, "fetched"

    def _keep(self, url: str, certificate: x509.Certificate, now: datetime) -> None:
        """Extend a CA that passed the CA rules to the positive TTL (at most until it expires)."""
        lifetime = (certificate.not_valid_after_utc - now).total_seconds()
        with self._lock:
            answer = self._answers.get(url)
            if answer is not None and answer.certificate == certificate:
                answer.expires = max(answer.expires, self._clock() + min(self._positive_ttl, lifetime))

    def _take_token(self, cloud: str, moment: float) -> bool:
        """Spend one fetch of ``cloud``'s budget; False when it is spent. Called under the lock."""
        bucket = self._buckets.setdefault(cloud, _Bucket(tokens=self._burst, updated=moment))
        bucket.tokens = min(self._burst, bucket.tokens + (moment - bucket.updated) * self._refill_per_second)
        bucket.updated = moment
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True
