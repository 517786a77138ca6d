"""Hot reload of the pinned trust, with the metrics an operator rotates pins by.

A :class:`ReloadingVerifier` owns the current :class:`~attest_service.verify.DocumentVerifier`. At most once
per interval (``ATTEST_TRUST_RELOAD_SECONDS``) a request checks a cheap fingerprint of the pinned directory
(:func:`~attest_service.trust.loading.directory_fingerprint`: the metadata of every entry the loader reads);
when it changed, the directory is loaded in full and the new DocumentVerifier replaces the old one in a
single assignment, so a request sees the old trust or the new trust, never a mixture. A directory that fails
to load leaves the last good trust in place, logs the reason, counts
``attest_trust_reload_total{result="failure"}`` and raises the ``attest_trust_reload_failing`` gauge until a
later load succeeds, with one exception: the CAs the directory's ``removed.txt`` files name are taken out of
it all the same (a removal only narrows the trust, and must not wait for the rest of the directory to be
fixed).

SIGHUP: :meth:`ReloadingVerifier.request_reload` only sets a flag (safe in a signal handler); the next request
reloads whether or not the fingerprint changed. The web application installs the handler in each gunicorn
worker (``post_worker_init``), because gunicorn resets SIGHUP to its default (terminate) in workers::

    signal.signal(signal.SIGHUP, lambda _signum, _frame: verifier.request_reload())

Sending SIGHUP to the gunicorn *master* instead restarts the workers gracefully, which also reloads.

Metrics (multiprocess-safe under gunicorn: counters and the ``livemax`` gauge live in
``PROMETHEUS_MULTIPROC_DIR``; the per-pin expiry gauges come from a collector on the default registry
that describes the trust of the process answering ``/metrics``):

- ``attest_pinned_certificate_not_after_seconds{cloud,role,subject,sha256}``: each pin's expiry (Unix time).
- ``attest_verifications_by_issuer_total{issuer}``: verified documents by the CN of the signer's issuer.
- ``attest_unpinned_issuer_total{issuer}``: chains that failed at an issuer no pin names: the first sign
  of an Azure rotation. Counted after the signature and name checks (steps 4 and 5). Anyone can sign a
  document with a certificate of their own that passes those and names any issuer, organisation and
  caIssuers URL, so an issuer gets a label of its own only once it is proven
  (:func:`~attest_service.trust.issuers.proven_issuer`): its certificate, carried in the document or
  fetched by the AIA fallback, chains to a pinned root of the cloud and signed the signer's certificate.
  Only the cloud's CAs can do that; the first :data:`MAX_UNPINNED_ISSUER_LABELS` of them are named, later
  ones count under ``other``. Every other refusal counts under ``issuer="unproven"``: a genuine rotation
  while the fallback is off (Azure's documents carry no CA) or a forgery, which the alerts treat as a
  rate, never as a page. Each is logged with the issuer's name and the signer's caIssuers URL, escaped
  (:func:`~attest_service.logsafe.loggable`): a proven issuer once per :data:`UNPINNED_LOG_SECONDS`, an
  unproven name once per that interval and at most one unproven line per :data:`UNPROVEN_LOG_SECONDS`.
- ``attest_trust_reload_total{result}`` (success, failure) and ``attest_trust_reload_failing`` (alert).
- ``attest_trust_problems``: what the trust in use passed over when it loaded (a file that is not a pin, a
  root certifi no longer carries, a pinned file ``removed.txt`` lists and that is therefore not trusted, a
  CRL that is not used);
  each is also logged at WARNING on every load. Such a load succeeds, but trusts less than the files seem
  to say.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from cryptography import x509
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import AttestError, ConfigurationError, UntrustedChain
from attest_service.logsafe import loggable
from attest_service.trust import (
    CloudTrust,
    PinnedCertificate,
    TrustStore,
    common_name,
    fingerprint,
    load_trust,
    revocation_metrics,
)
from attest_service.trust.certificates import ca_issuers_urls
from attest_service.trust.issuers import AiaPolicy, proven_issuer
from attest_service.trust.loading import (
    Fingerprint,
    directory_fingerprint,
    excluded_message,
    read_removed,
    without_removed,
)
from attest_service.verify import (
    DocumentVerifier,
    VerificationPolicy,
    VerifiedDocument,
    carried_certificates,
    cloud_for_signer,
    signer_certificate,
)

if TYPE_CHECKING:
    from attest_service.trust.aia import AiaFetcher
    from attest_service.trust.fetched import PinFetch, PinnedCaFetcher

LOG: Final = logging.getLogger(__name__)

#: Distinct ``issuer`` label values of ``attest_unpinned_issuer_total``; the issuer name of a refused
#: document is chosen by whoever made it, so later names are counted under ``other``.
MAX_UNPINNED_ISSUER_LABELS: Final = 32
#: Longest issuer label, in characters.
MAX_ISSUER_LABEL_CHARS: Final = 64
#: Issuer strings whose label is remembered; a verified chain names a pinned CA, so a few dozen are in use.
MAX_CACHED_LABELS: Final = 256
#: The label of unpinned issuers nothing proves to be the cloud's (see the module docstring).
UNPROVEN_ISSUER: Final = "unproven"
#: The label of proven issuers beyond the first :data:`MAX_UNPINNED_ISSUER_LABELS`.
OTHER_ISSUER: Final = "other"
#: Seconds between two log lines about the same unpinned issuer.
UNPINNED_LOG_SECONDS: Final = 300.0
#: Seconds between two log lines about unproven issuers, whatever they claim: forged names are free to make.
UNPROVEN_LOG_SECONDS: Final = 10.0
#: Unproven issuer names whose last log line is remembered (the oldest is forgotten first).
MAX_REMEMBERED_UNPROVEN: Final = 256
#: CAs fetched through AIA kept beside one trust; beyond it the set starts afresh (the fetcher still caches).
MAX_FETCHED_CAS: Final = 64

RELOADS: Final = Counter("attest_trust_reload", "Loads of a changed pinned directory, by result (success, failure).",
                         ["result"])
RELOAD_FAILING: Final = Gauge("attest_trust_reload_failing",
                              "1 while the pinned directory cannot be loaded and the last good trust is in use.",
                              multiprocess_mode="livemax")
TRUST_PROBLEMS: Final = Gauge("attest_trust_problems",
                              "Problems the trust in use was loaded with (files not loaded, certifi roots missing, "
                              "pinned files removed.txt lists): each narrows the trust; the log names them.",
                              multiprocess_mode="livemax")
VERIFICATIONS_BY_ISSUER: Final = Counter("attest_verifications_by_issuer",
                                         "Verified documents by the common name of the signer's issuing CA.",
                                         ["issuer"])
UNPINNED_ISSUER: Final = Counter("attest_unpinned_issuer",
                                 "Documents whose signer's issuing CA is not pinned (untrusted_chain), by the CA's "
                                 "common name once it is proven to chain to a pinned root and to have signed the "
                                 'signer; issuer="unproven" for the rest (forgeries, or a rotation while the AIA '
                                 "fallback is off).", ["issuer"])

@dataclass(frozen=True, slots=True)
class _Loaded:
    verifier: DocumentVerifier
    fingerprint: Fingerprint


@dataclass(frozen=True, slots=True)
class _Augmented:
    """A DocumentVerifier over the current trust plus CAs fetched through AIA, valid while ``base`` is current."""

    base: DocumentVerifier
    extra: MappingProxyType[tuple[str, str], PinnedCertificate]
    verifier: DocumentVerifier


def _load(directory: Path) -> TrustStore:
    trust = load_trust(directory)
    if not any(True for _ in trust.all_pins()):
        # An empty mount (a ConfigMap that failed to project) would otherwise silently trust nothing.
        raise ConfigurationError(f"{directory}: no pinned certificate at all")
    _log_problems(trust)
    return trust


def _problems(trust: TrustStore) -> list[str]:
    """What a load passed over: each narrows the trust without failing the load."""
    return [message for cloud in trust.clouds.values()
            for message in (*cloud.problems, *cloud.ignored, *map(excluded_message, cloud.excluded),
                            *cloud.removed_errors, *cloud.crl_problems)]


def _log_problems(trust: TrustStore) -> None:
    for message in _problems(trust):
        LOG.warning("pinned directory %s: %s", trust.directory, message)


def _issuer_label(issuer: x509.Name | str) -> str:
    """The CN of ``issuer`` (a Name or its RFC 4514 string), cut to the label length limit."""
    if isinstance(issuer, str):
        return _label_of_string(issuer)
    return common_name(issuer)[:MAX_ISSUER_LABEL_CHARS]


@functools.lru_cache(maxsize=MAX_CACHED_LABELS)
def _label_of_string(issuer: str) -> str:
    # Parsing an RFC 4514 string costs more than the rest of a cached verification (tens of microseconds),
    # and every verified document names one of a handful of issuing CAs: remember the answer per string.
    try:
        name = x509.Name.from_rfc4514_string(issuer)
    except ValueError:
        return issuer[:MAX_ISSUER_LABEL_CHARS]
    return common_name(name)[:MAX_ISSUER_LABEL_CHARS]


class ReloadingVerifier:
    """The current trust of a process, reloaded when the pinned directory changes.

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
        self._interval = interval_seconds
        self._aia = aia
        self._pinned_fetch = pinned_fetch
        self._clock = clock
        seen: Fingerprint | None = None
        boot_failure: ConfigurationError | None = None
        try:
            seen = directory_fingerprint(directory)
            self._loaded = _Loaded(self._verifier_for(_load(directory)), seen)
        except ConfigurationError as exc:
            if last_good is None:
                raise
            # A worker respawned while the directory is broken serves the last good trust rather than not
            # booting (gunicorn halts when a worker cannot boot). No directory's fingerprint is empty
            # (there is an entry per cloud and folder), so the first good content found later is loaded.
            self._loaded = _Loaded(self._verifier_for(last_good), ())
            boot_failure = exc
        self._failing = False
        self._failed: Fingerprint | None = None
        self._next_check = clock() + interval_seconds
        self._reload_requested = False
        self._check_lock = threading.Lock()
        self._augmented: _Augmented | None = None
        self._augment_lock = threading.Lock()
        self._unpinned_labels: set[str] = set()
        self._unpinned_logged: dict[str, float] = {}
        self._unproven_logged: dict[str, float] = {}
        self._unproven_quiet_until = float("-inf")
        self._label_policy = aia.policy if aia is not None else AiaPolicy.azure()
        RELOAD_FAILING.set(0)
        for result in ("success", "failure"):
            # Both series exist from the start, so that rate() and increase() alerts see a zero, not nothing.
            RELOADS.labels(result=result)
        _publish(self)
        if boot_failure is not None:
            self._fail(boot_failure, seen)
        self._fetch_pinned()

    # --- reload ---------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask for a full reload on the next request (SIGHUP); only sets a flag, so signal-handler safe."""
        self._reload_requested = True

    @property
    def trust(self) -> TrustStore:
        """The trust currently in use."""
        return self._loaded.verifier.trust

    @property
    def failing(self) -> bool:
        """True while the directory's current content cannot be loaded."""
        return self._failing

    def verifier(self) -> DocumentVerifier:
        """The current DocumentVerifier, after reloading if the interval passed and the directory changed."""
        if self._reload_requested or self._clock() >= self._next_check:
            self._maybe_reload()
        return self._loaded.verifier

    def _maybe_reload(self) -> None:
        # Only one thread checks; the others go on with the current trust instead of queueing behind a load.
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            forced = self._reload_requested
            if not forced and self._clock() < self._next_check:
                return
            self._reload_requested = False
            self._reload(forced=forced)
            self._next_check = self._clock() + self._interval
        finally:
            self._check_lock.release()

    def _reload(self, *, forced: bool) -> None:
        try:
            # The fingerprint is taken before the load: a change made during the load shows at the next check.
            seen = directory_fingerprint(self.directory)
        except ConfigurationError as exc:
            self._fail(exc, None)
            return
        if not forced and seen == self._loaded.fingerprint:
            if self.failing:
                # The directory is back to the content in use (a broken edit was undone): nothing to load.
                self._succeeded()
            return
        if not forced and self.failing and seen == self._failed:
            return
        try:
            trust = _load(self.directory)
        except ConfigurationError as exc:
            self._fail(exc, seen)
            return
        self._loaded = _Loaded(self._verifier_for(trust), seen)  # the one assignment that swaps the trust
        self._succeeded()
        self._fetch_pinned()
        LOG.info("pinned trust reloaded from %s: %d certificates, %d CRLs", self.directory,
                 sum(1 for _ in trust.all_pins()), sum(len(cloud.crls) for cloud in trust.clouds.values()))

    # --- CAs pinned by fingerprint, fetched in the background ------------------------------------

    def _verifier_for(self, trust: TrustStore) -> DocumentVerifier:
        """A verifier over ``trust`` plus the fingerprint-pinned CAs fetched so far (checked against it)."""
        return DocumentVerifier(trust if self._pinned_fetch is None else self._pinned_fetch.augment(trust))

    def _fetch_pinned(self) -> None:
        """Fetch, off the request path, the fingerprint-pinned CAs of the trust in use not held yet."""
        if self._pinned_fetch is not None:
            self._pinned_fetch.refresh(self._loaded.verifier.trust, self._pinned_fetched)

    def _pinned_fetched(self) -> None:
        # Called from the fetching thread. The lock of the reload check makes this swap and a reload's swap
        # one after the other, so neither undoes the other.
        with self._check_lock:
            current = self._loaded
            self._loaded = _Loaded(self._verifier_for(current.verifier.trust), current.fingerprint)
        _publish(self)
        LOG.info("pinned trust of %s: fingerprint-pinned CAs fetched and in use", self.directory)

    def _offer_issuer_url(self, signer: x509.Certificate, cloud_trust: CloudTrust) -> None:
        """Let the background fetcher try the signer's caIssuers URL for the cloud's URL-less fingerprint pins."""
        if self._pinned_fetch is not None and self._pinned_fetch.offer(cloud_trust, ca_issuers_urls(signer)):
            self._fetch_pinned()

    def pinned_fetches(self) -> list[PinFetch]:
        """Each fingerprint pin of the trust in use with whether its certificate is fetched (metrics)."""
        if self._pinned_fetch is None:
            return []
        return self._pinned_fetch.states(self._loaded.verifier.trust)

    def _succeeded(self) -> None:
        self._failing = False
        self._failed = None
        RELOADS.labels(result="success").inc()
        RELOAD_FAILING.set(0)
        _publish(self)

    def _fail(self, exc: ConfigurationError, seen: Fingerprint | None) -> None:
        # Logged once per broken content, not once per interval; counted on every attempt.
        if not self.failing or seen != self._failed:
            LOG.error("pinned directory %s is unusable, keeping the last good trust: %s", self.directory, exc.message)
        self._failing = True
        self._failed = seen
        RELOADS.labels(result="failure").inc()
        RELOAD_FAILING.set(1)
        self._apply_removals()

    def _apply_removals(self) -> None:
        """Take every CA the directory's removed lists name now out of the last good trust in use.

        A broken directory keeps the last good trust, but a removal is the one change that must not wait for
        the rest of the directory to be fixed: it only narrows the trust. Removals are never undone here;
        the next load of good content decides.
        """
        current = self._loaded.verifier.trust
        narrowed = without_removed(current, read_removed(self.directory))
        if narrowed is current:
            return
        # The empty fingerprint matches no directory: whatever good content comes next is loaded in full,
        # even the very content the last good trust came from.
        self._loaded = _Loaded(DocumentVerifier(narrowed), ())
        dropped = [f"{pin.cloud}: {pin.subject_cn} (sha256 {pin.sha256})" for cloud in narrowed.clouds.values()
                   for pin in cloud.excluded if pin not in current.for_cloud(pin.cloud).excluded]
        LOG.error("pinned directory %s: applied its removed.txt to the last good trust; no longer trusted: %s",
                  self.directory, "; ".join(dropped) or "no pinned file (the AIA fallback refuses the CAs listed)")
        _publish(self)

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
        except UntrustedChain:
            unpinned = self._unpinned_signer(document, policy, verifier.trust)
            if unpinned is None:
                raise
            signer, cloud_trust = unpinned
            if self._aia is None:
                self._count_unpinned(signer, cloud_trust, self._carried_issuer(document, signer, cloud_trust, now))
                self._offer_issuer_url(signer, cloud_trust)
                raise
            try:
                fetched = self._aia.issuer_for(signer, cloud_trust, now=now)
            except UntrustedChain:
                self._count_unpinned(signer, cloud_trust, self._carried_issuer(document, signer, cloud_trust, now))
                raise
            # issuer_for accepted the CA and checked that it issued the signer: the proof of proven_issuer.
            self._count_unpinned(signer, cloud_trust, fetched.certificate)
            result = self._augmented_verifier(verifier, cloud_trust.profile.name, fetched).verify(
                document, policy=policy, now=now)
        revocation_metrics.count_unknown(result)
        if len(result.signer.chain) > 1:
            VERIFICATIONS_BY_ISSUER.labels(issuer=_issuer_label(result.signer.chain[1])).inc()
        return result

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
        return proven_issuer(signer, carried, cloud_trust, policy=self._label_policy, now=now)

    def _count_unpinned(self, signer: x509.Certificate, cloud_trust: CloudTrust,
                        proven: x509.Certificate | None) -> None:
        """Count a refusal at an unpinned issuer under its name when ``proven``, else under ``unproven``; log it."""
        cloud = cloud_trust.profile.name
        if proven is None:
            label = UNPROVEN_ISSUER
        else:
            label = _issuer_label(proven.subject)
            if label not in self._unpinned_labels:
                if len(self._unpinned_labels) >= MAX_UNPINNED_ISSUER_LABELS:
                    label = OTHER_ISSUER
                else:
                    self._unpinned_labels.add(label)
        UNPINNED_ISSUER.labels(issuer=label).inc()
        issuer = signer.issuer.rfc4514_string()
        if not self._log_due(label, issuer):
            return
        urls = ", ".join(loggable(url) for url in ca_issuers_urls(signer)[:2]) or "none"
        if proven is not None:
            LOG.warning("unpinned issuing CA '%s' (sha256 %s, caIssuers %s) signed a %s document (counted as "
                        "issuer=%r); pin it: attest-service certs add --cloud %s --from-document DOCUMENT",
                        loggable(issuer), fingerprint(proven), urls, cloud, label, cloud)
            return
        LOG.warning("unpinned issuing CA '%s' (caIssuers %s) is named by a %s document that does not prove it "
                    "(counted as issuer=%r): a forgery, or a new CA of the cloud while the AIA fallback is off or "
                    "fails; if Microsoft lists it, pin it: attest-service certs add --cloud %s --from-document "
                    "DOCUMENT", loggable(issuer), urls, cloud, label, cloud)

    def _log_due(self, label: str, issuer: str) -> bool:
        """Whether a refusal under ``label`` naming ``issuer`` is logged now (the intervals of the docstring)."""
        moment = self._clock()
        if label != UNPROVEN_ISSUER:
            # One line per label and interval: the proven labels are bounded, and only the cloud's CAs get one.
            if moment < self._unpinned_logged.get(label, float("-inf")):
                return False
            self._unpinned_logged[label] = moment + UNPINNED_LOG_SECONDS
            return True
        # Unproven names cost nothing to make: one line per name and interval, and a floor between any two.
        if moment < self._unproven_quiet_until or moment < self._unproven_logged.get(issuer, float("-inf")):
            return False
        self._unproven_quiet_until = moment + UNPROVEN_LOG_SECONDS
        self._unproven_logged.pop(issuer, None)
        while len(self._unproven_logged) >= MAX_REMEMBERED_UNPROVEN:
            del self._unproven_logged[next(iter(self._unproven_logged))]
        self._unproven_logged[issuer] = moment + UNPINNED_LOG_SECONDS
        return True

    def _augmented_verifier(self, base: DocumentVerifier, cloud: str, fetched: PinnedCertificate) -> DocumentVerifier:
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


# --- the per-pin expiry gauges ----------------------------------------------------------------------

_published: ReloadingVerifier | None = None


def _publish(verifier: ReloadingVerifier) -> None:
    global _published  # noqa: PLW0603 - one trust per process is exposed; the newest verifier is it
    _published = verifier
    TRUST_PROBLEMS.set(len(_problems(verifier.trust)))
    revocation_metrics.publish(verifier.trust)


class PinnedCertificateCollector(Collector):
    """``attest_pinned_certificate_not_after_seconds`` for the trust of the newest ReloadingVerifier.

    A collector rather than a Gauge: an unpinned certificate must disappear from ``/metrics``, which
    multiprocess Gauge files cannot express.
    """

    def collect(self) -> Iterator[Metric]:
        """Yield the gauge family (empty before any verifier exists)."""
        family = GaugeMetricFamily("attest_pinned_certificate_not_after_seconds",
                                   "Expiry (Unix time) of each pinned certificate.",
                                   labels=["cloud", "role", "subject", "sha256"])
        verifier = _published
        if verifier is not None:
            for pin in verifier.trust.all_pins():
                family.add_metric([pin.cloud, pin.role, pin.subject_cn, pin.sha256], pin.not_after.timestamp())
        yield family


class FingerprintPinCollector(Collector):
    """``attest_fingerprint_pin_fetched``: 1 for each fingerprint pin whose certificate is fetched and held, else 0."""

    def collect(self) -> Iterator[Metric]:
        """Yield the gauge family (empty before any verifier exists, or without background fetching)."""
        family = GaugeMetricFamily("attest_fingerprint_pin_fetched",
                                   "1 when the CA a fingerprint pin names is fetched and held, 0 while it is not "
                                   "(state: fetched, pending, failed, no_url).",
                                   labels=["cloud", "name", "digest", "state"])
        verifier = _published
        if verifier is not None:
            for fetch in verifier.pinned_fetches():
                pin = fetch.pin
                family.add_metric([pin.cloud, pin.name[:MAX_ISSUER_LABEL_CHARS], pin.digest, fetch.state],
                                  1.0 if fetch.state == "fetched" else 0.0)
        yield family


REGISTRY.register(PinnedCertificateCollector())
REGISTRY.register(FingerprintPinCollector())

