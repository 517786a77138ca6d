"""The trust's metrics: loads of the pinned directory, verifications by issuer, unpinned issuers, the pins.

Counters and the ``livemax`` gauges live in ``PROMETHEUS_MULTIPROC_DIR`` under gunicorn; the per-pin gauges
come from collectors on the default registry that describe the trust of the process answering ``/metrics``
(the one :func:`publish` named last).

- ``attest_pinned_certificate_not_after_seconds{cloud,role,subject,sha256}``: each pin's expiry (Unix time).
- ``attest_fingerprint_pin_fetched{cloud,name,digest,state}``: whether a fingerprint pin's CA is held.
- ``attest_verifications_by_issuer_total{issuer}``: verified documents by the CN of the signer's issuer.
- ``attest_unpinned_issuer_total{issuer}``: chains that failed at an issuer no pin names (:class:`UnpinnedIssuers`).
- ``attest_trust_reload_total{result}`` (success, failure) and ``attest_trust_reload_failing`` (alert).
- ``attest_trust_problems``: what the trust in use passed over when it loaded (a file that is not a pin, a
  root certifi no longer carries, a pinned file ``removed.txt`` lists, a CRL that is not used); each
  narrows the trust.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, Protocol

from cryptography import x509
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from attest_service.logsafe import loggable
from attest_service.trust import CloudTrust, TrustStore, common_name, fingerprint, revocation_metrics
from attest_service.trust.certificates import ca_issuers_urls
from attest_service.trust.loading import excluded_message
from attest_service.verify import VerifiedDocument

if TYPE_CHECKING:
    from attest_service.trust.fetched import PinFetch

LOG: Final = logging.getLogger(__name__)

#: Distinct ``issuer`` label values of ``attest_unpinned_issuer_total``; the issuer name of a refused
#: document is chosen by whoever made it, so later names are counted under ``other``.
MAX_UNPINNED_ISSUER_LABELS: Final = 32
#: Longest issuer label, in characters.
MAX_ISSUER_LABEL_CHARS: Final = 64
#: Issuer strings whose label is remembered; a verified chain names a pinned CA, so a few dozen are in use.
MAX_CACHED_LABELS: Final = 256
#: The label of unpinned issuers nothing proves to be the cloud's (see :class:`UnpinnedIssuers`).
UNPROVEN_ISSUER: Final = "unproven"
#: The label of proven issuers beyond the first :data:`MAX_UNPINNED_ISSUER_LABELS`.
OTHER_ISSUER: Final = "other"
#: Seconds between two log lines about the same unpinned issuer.
UNPINNED_LOG_SECONDS: Final = 300.0
#: Seconds between two log lines about unproven issuers, whatever they claim: forged names are free to make.
UNPROVEN_LOG_SECONDS: Final = 10.0
#: Unproven issuer names whose last log line is remembered (the oldest is forgotten first).
MAX_REMEMBERED_UNPROVEN: Final = 256

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


def problems(trust: TrustStore) -> list[str]:
    """What a load passed over: each narrows the trust without failing the load."""
    return [message for cloud in trust.clouds.values()
            for message in (*cloud.problems, *cloud.ignored, *map(excluded_message, cloud.excluded),
                            *cloud.removed_errors, *cloud.crl_problems)]


def issuer_label(issuer: x509.Name | str) -> str:
    """The CN of ``issuer`` (a Name or its RFC 4514 string), cut to the label length limit."""
    if isinstance(issuer, str):
        return _label_of_string(issuer)
    return common_name(issuer)[:MAX_ISSUER_LABEL_CHARS]


@functools.lru_cache(maxsize=MAX_CACHED_LABELS)
def _label_of_string(issuer: str) -> str:
    # Parsing an RFC 4514 string costs more than the rest of a cached verification,
    # and every verified document names one of a handful of issuing CAs: remember the answer per string.
    try:
        name = x509.Name.from_rfc4514_string(issuer)
    except ValueError:
        return issuer[:MAX_ISSUER_LABEL_CHARS]
    return common_name(name)[:MAX_ISSUER_LABEL_CHARS]


def count_verified(result: VerifiedDocument) -> None:
    """Count a verified document under the CN of its signer's issuing CA."""
    if len(result.signer.chain) > 1:
        _verified_by(result.signer.chain[1]).inc()


@functools.lru_cache(maxsize=MAX_CACHED_LABELS)
def _verified_by(issuer: str) -> Counter:
    # The labelled child, looked up once per issuing CA: labels() costs as much again as the increment itself,
    # on every verification.
    return VERIFICATIONS_BY_ISSUER.labels(issuer=issuer_label(issuer))


class UnpinnedIssuers:
    """Counts and logs the refusals at an issuing CA no pin names: the first sign of an Azure rotation.

    Counted after the signature and name checks (steps 4 and 5). Anyone can sign a document with a
    certificate of their own that passes those and names any issuer, organisation and caIssuers URL, so an
    issuer gets a label of its own only once it is proven (:func:`~attest_service.trust.issuers.proven_issuer`):
    its certificate, carried in the document or fetched by the AIA fallback, chains to a pinned root of the
    cloud and signed the signer's certificate. Only the cloud's CAs can do that; the first
    :data:`MAX_UNPINNED_ISSUER_LABELS` of them are named, later ones count under ``other``. Every other refusal
    counts under ``issuer="unproven"``: a genuine rotation while the fallback is off (Azure's documents carry
    no CA) or a forgery, which the alerts treat as a rate, never as a page. Each is logged with the issuer's
    name and the signer's caIssuers URL, escaped (:func:`~attest_service.logsafe.loggable`): a proven issuer
    once per :data:`UNPINNED_LOG_SECONDS`, an unproven name once per that interval and at most one unproven
    line per :data:`UNPROVEN_LOG_SECONDS`.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._labels: set[str] = set()
        self._logged: dict[str, float] = {}
        self._unproven_logged: dict[str, float] = {}
        self._unproven_quiet_until = float("-inf")

    def count(self, signer: x509.Certificate, cloud_trust: CloudTrust, proven: x509.Certificate | None) -> None:
        """Count a refusal at an unpinned issuer under its name when ``proven``, else under ``unproven``; log it."""
        cloud = cloud_trust.profile.name
        if proven is None:
            label = UNPROVEN_ISSUER
        else:
            label = issuer_label(proven.subject)
            if label not in self._labels:
                if len(self._labels) >= MAX_UNPINNED_ISSUER_LABELS:
                    label = OTHER_ISSUER
                else:
                    self._labels.add(label)
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
        """Whether a refusal under ``label`` naming ``issuer`` is logged now (the intervals of the class docstring)."""
        moment = self._clock()
        if label != UNPROVEN_ISSUER:
            # One line per label and interval: the proven labels are bounded, and only the cloud's CAs get one.
            if moment < self._logged.get(label, float("-inf")):
                return False
            self._logged[label] = moment + UNPINNED_LOG_SECONDS
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


class PublishedTrust(Protocol):
    """What the per-pin gauges read of the trust in use (a :class:`~attest_service.trust.reload.ReloadingVerifier`)."""

    @property
    def trust(self) -> TrustStore:
        """The trust in use."""
        ...

    def pinned_fetches(self) -> list[PinFetch]:
        """Each fingerprint pin of the trust in use with whether its certificate is held."""
        ...


_published: PublishedTrust | None = None


def publish(verifier: PublishedTrust) -> None:
    """Make ``verifier``'s trust the one the per-pin gauges describe, and count what its load passed over."""
    global _published  # noqa: PLW0603 - one trust per process is exposed; the newest verifier is it
    _published = verifier
    TRUST_PROBLEMS.set(len(problems(verifier.trust)))
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

