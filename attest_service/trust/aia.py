"""Optional AIA fallback: fetch an unpinned issuing CA from the signer's caIssuers URL, under strict rules.

Off by default (``ATTEST_AIA_FETCH=1`` turns it on): pinning stays the way to trust a CA, and the fallback
only bridges the days between Azure signing with a new issuing CA and the operator pinning it.
:class:`AiaFetcher` fetches and holds to the rules; :class:`AiaFallback` is what a refusal at an unpinned
issuer goes through.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final, TypeVar

from cryptography import x509
from prometheus_client import Counter

from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import AttestError, UntrustedChain
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
    proven_issuer,
)
from attest_service.trust.metrics import UnpinnedIssuers
from attest_service.verify import (
    CloudTrust,
    DocumentVerifier,
    PinnedCertificate,
    TrustStore,
    VerificationPolicy,
    VerifiedDocument,
    carried_certificates,
    cloud_for_signer,
    signer_certificate,
)

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
    "AiaFallback",
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
    """Fetches and validates unpinned issuing CAs for the service.

    Every use is logged and counted (``attest_aia_fetch_total{result}``) so that the operator does pin the CA.

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

    A fetched CA is trusted (:class:`AiaFallback`) alongside the pins until the pins reload; after a reload
    it is taken from this fetcher's cache again, re-checked against the new pins, without a new fetch.

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


#: CAs fetched through AIA kept beside one trust; beyond it the set starts afresh (the fetcher still caches).
MAX_FETCHED_CAS: Final = 64


@dataclass(frozen=True, slots=True)
class _Augmented:
    """A DocumentVerifier over the current trust plus CAs fetched through AIA, valid while ``base`` is current."""

    base: DocumentVerifier
    extra: MappingProxyType[tuple[str, str], PinnedCertificate]
    verifier: DocumentVerifier


class AiaFallback:
    """What a refusal at an unpinned issuer goes through before it is final.

    The refusal is counted and logged (:class:`~attest_service.trust.metrics.UnpinnedIssuers`); with a
    fetcher (the AIA fallback on), the issuer is fetched under the rules above and the document verified
    again with it beside the pins of the trust in use. Safe to call from many threads.
    """

    def __init__(self, fetcher: AiaFetcher | None, unpinned: UnpinnedIssuers, *,
                 offer_issuer_url: Callable[[x509.Certificate, CloudTrust], None] = lambda _signer, _trust: None,
                 ) -> None:
        self._aia = fetcher
        #: Told the signer of a refusal while the fallback is off, so that the background fetch of the
        #: fingerprint pins without a URL may try its caIssuers URL (:mod:`attest_service.trust.fetched`).
        self._offer_issuer_url = offer_issuer_url
        self._unpinned = unpinned
        self._policy = fetcher.policy if fetcher is not None else AiaPolicy.azure()
        self._augmented: _Augmented | None = None
        self._augment_lock = threading.Lock()

    def verify(self, verifier: DocumentVerifier, document: bytes, *, policy: VerificationPolicy, now: datetime,
               refusal: UntrustedChain) -> VerifiedDocument:
        """Verify ``document``, which ``verifier`` refused with ``refusal``, with its issuer fetched.

        Raises ``refusal`` (or the fetch's UntrustedChain) when the fallback cannot help.
        """
        unpinned = self._unpinned_signer(document, policy, verifier.trust)
        if unpinned is None:
            raise refusal
        signer, cloud_trust = unpinned
        if self._aia is None:
            self._unpinned.count(signer, cloud_trust, self._carried_issuer(document, signer, cloud_trust, now))
            self._offer_issuer_url(signer, cloud_trust)
            raise refusal
        try:
            fetched = self._aia.issuer_for(signer, cloud_trust, now=now)
        except UntrustedChain:
            self._unpinned.count(signer, cloud_trust, self._carried_issuer(document, signer, cloud_trust, now))
            raise
        # issuer_for accepted the CA and checked that it issued the signer: the proof of proven_issuer.
        self._unpinned.count(signer, cloud_trust, fetched.certificate)
        return self._augmented_verifier(verifier, cloud_trust.profile.name, fetched).verify(
            document, policy=policy, now=now)

    def _unpinned_signer(self, document: bytes, policy: VerificationPolicy,
                         trust: TrustStore) -> tuple[x509.Certificate, CloudTrust] | None:
        """The signer and its cloud's trust when no pin of that cloud is named as the signer's issuer."""
        try:
            signer = signer_certificate(document)
            cloud = cloud_for_signer(signer) if policy.cloud == AUTO else CLOUDS[policy.cloud]
        except AttestError:
            return None
        cloud_trust = trust.for_cloud(cloud.name)
        if any(pin.certificate.subject == signer.issuer for pin in (*cloud_trust.roots, *cloud_trust.intermediates)):
            return None
        return signer, cloud_trust

    def _carried_issuer(self, document: bytes, signer: x509.Certificate, cloud_trust: CloudTrust,
                        now: datetime) -> x509.Certificate | None:
        """The signer's issuing CA when the document carries it and it is proven (``proven_issuer``)."""
        try:
            carried = carried_certificates(document)
        except AttestError:
            return None
        return proven_issuer(signer, carried, cloud_trust, policy=self._policy, now=now)

    def _augmented_verifier(self, base: DocumentVerifier, cloud: str,
                            fetched: PinnedCertificate) -> DocumentVerifier:
        key = (cloud, fetched.sha256)
        with self._augment_lock:
            current = self._augmented
            if current is not None and current.base is base and key in current.extra:
                return current.verifier
            # After a reload the set starts afresh: each fetched CA comes back from the fetcher's cache with its
            # next document, re-checked against the new pins (a removed pin or root then stops it), not fetched.
            extra = dict(current.extra) if current is not None and current.base is base else {}
            if len(extra) >= MAX_FETCHED_CAS:
                extra = {}
            extra[key] = fetched
            # Every fetched CA of a cloud joins that cloud's pins (each is built on the trust in use, not on
            # the previous CA's cloud, which dropped all but the last one).
            added: dict[str, list[PinnedCertificate]] = {}
            for (name, _), pin in extra.items():
                added.setdefault(name, []).append(pin)
            clouds = dict(base.trust.clouds)
            for name, pins in added.items():
                trust = base.trust.for_cloud(name)
                clouds[name] = dataclasses.replace(trust, intermediates=(
                    *trust.intermediates, *(pin for pin in pins if pin not in trust.intermediates)))
            augmented = TrustStore(clouds=MappingProxyType(clouds), directory=base.trust.directory)
            self._augmented = _Augmented(base, MappingProxyType(extra), DocumentVerifier(augmented))
            return self._augmented.verifier
