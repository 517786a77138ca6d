"""The revocation metrics of the running service: CRL freshness and verifications accepted without a status.

- ``attest_crl_next_update_timestamp_seconds{cloud,issuer,file}``: the nextUpdate (Unix time) of each CRL in
  the trust in use; a CRL past it no longer counts, so ``time() > this`` is a stale CRL (an alert watches it).
- ``attest_crl_this_update_timestamp_seconds{cloud,issuer,file}``: its thisUpdate, beside it.
- ``attest_revocation_unknown_total{cloud}``: documents accepted in ``soft`` mode although no current CRL
  covered some certificate on their path.

Refusals for a revoked certificate are counted where every refusal is, by ``attest_verifications_total``'s
``code`` label (``certificate_revoked``, ``revocation_unknown``), and logged at WARNING naming the certificate
and the CRL, once per certificate and :data:`REVOKED_LOG_SECONDS` (whoever holds a revoked key chooses how
often to send it).

The freshness gauges come from a collector on the default registry that describes the trust published last
(:func:`publish`, called by the reloading holder on every load), so a CRL taken out of the directory
disappears from ``/metrics``; the counter lives in the multiprocess files like the service's other counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Final

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from attest_service.errors import CertificateRevoked
from attest_service.logsafe import loggable
from attest_service.verify import TrustStore, VerifiedDocument

LOG: Final = logging.getLogger(__name__)
#: Seconds between two log lines about the same revoked certificate.
REVOKED_LOG_SECONDS: Final = 300.0
#: Revoked certificates whose last log line is remembered; beyond it the table starts afresh.
MAX_LOGGED: Final = 1024

REVOCATION_UNKNOWN: Final = Counter(
    "attest_revocation_unknown",
    "Documents accepted (revocation soft) although no current CRL covered a certificate on their path.",
    ["cloud"])

_published: TrustStore | None = None
_UNKNOWN_BY_CLOUD: Final[dict[str, Counter]] = {}
_logged: dict[str, float] = {}
_logged_lock = threading.Lock()


def publish(trust: TrustStore) -> None:
    """Make ``trust``'s CRLs the ones ``/metrics`` describes (the trust in use of this process)."""
    global _published  # noqa: PLW0603 - one trust per process is exposed: the one in use
    _published = trust


def count_unknown(result: VerifiedDocument) -> None:
    """Count ``result`` when it was accepted without a known revocation status."""
    if result.revocation_unknown:
        child = _UNKNOWN_BY_CLOUD.get(result.cloud)
        if child is None:
            # Looked up once per cloud (a handful): labels() costs as much again as the increment itself, and
            # in soft mode without CRLs every accepted document is counted here.
            child = _UNKNOWN_BY_CLOUD[result.cloud] = REVOCATION_UNKNOWN.labels(cloud=result.cloud)
        child.inc()


def log_revoked(error: CertificateRevoked) -> None:
    """Log a refusal for a revoked certificate, once per certificate and :data:`REVOKED_LOG_SECONDS`."""
    moment = time.monotonic()
    with _logged_lock:
        if moment < _logged.get(error.message, float("-inf")):
            return
        if len(_logged) >= MAX_LOGGED:
            _logged.clear()
        _logged[error.message] = moment + REVOKED_LOG_SECONDS
    LOG.warning("refused a document signed under a revoked certificate (certificate_revoked): %s",
                loggable(error.message, 400))


class CrlCollector(Collector):
    """``attest_crl_next_update_timestamp_seconds`` and ``..._this_update_...`` for each CRL in use."""

    def collect(self) -> Iterator[Metric]:
        """Yield both gauge families (empty before any trust is published)."""
        labels = ["cloud", "issuer", "file"]
        next_update = GaugeMetricFamily("attest_crl_next_update_timestamp_seconds",
                                        "nextUpdate (Unix time) of each CRL in use; past it the CRL no longer "
                                        "counts.", labels=labels)
        this_update = GaugeMetricFamily("attest_crl_this_update_timestamp_seconds",
                                        "thisUpdate (Unix time) of each CRL in use.", labels=labels)
        trust = _published
        if trust is not None:
            for cloud in trust.clouds.values():
                for crl in cloud.crls:
                    values = [crl.cloud, crl.issuer_name, crl.source]
                    next_update.add_metric(values, crl.next_update.timestamp())
                    this_update.add_metric(values, crl.this_update.timestamp())
        yield next_update
        yield this_update


REGISTRY.register(CrlCollector())
