"""Prometheus metrics of the service, and their exposition.

Under gunicorn every worker is a process: with ``PROMETHEUS_MULTIPROC_DIR`` set (``serve`` sets it) the
client library keeps each value in a memory-mapped file of that directory and ``/metrics`` sums the files of
all workers. Without it (tests, a single process) the default registry is served as is. Collectors registered
by other modules on the default registry (the pinned-certificate expiry gauges) are exposed in both modes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

#: Environment variable that switches prometheus-client to multiprocess mode (read at its import).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Latency buckets in seconds: a verification with a cached chain takes about a millisecond; the store
#: timeout (0.5 s by default) bounds the slow end.
LATENCY_BUCKETS_SECONDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

VERIFICATIONS: Final = Counter(
    "attest_verifications",
    "Answers of POST /v1/verify by result (verified, refused, error) and error code (none when verified).",
    ["result", "code"],
)
VERIFICATION_SECONDS: Final = Histogram(
    "attest_verification_duration_seconds",
    "Time to answer POST /v1/verify, from parsed request to serialised answer.",
    buckets=LATENCY_BUCKETS_SECONDS,
)
STORE_ERRORS: Final = Counter(
    "attest_store_errors",
    "Nonce store operations that failed (the request was answered 503 store_unavailable).",
    ["operation"],
)
CHALLENGES_ISSUED: Final = Counter("attest_challenges_issued", "Challenges issued by POST /v1/challenges.")
CHALLENGES_CONSUMED: Final = Counter(
    "attest_challenges_consumed", "Service-issued challenges consumed by a successful verification."
)
CALLER_NONCES_ACCEPTED: Final = Counter(
    "attest_caller_nonces_accepted", "Caller-chosen (not service-issued) nonces accepted by a successful verification."
)
HTTP_REQUESTS: Final = Counter(
    "attest_http_requests", "HTTP requests answered, by route template and status code.", ["route", "status"]
)
RESULTS_ISSUED: Final = Counter(
    "attest_results_issued", "Attestation results (EAR tokens) signed, by the kid of the signing key.", ["kid"]
)
RESULT_KEY_RELOADS: Final = Counter(
    "attest_result_keys_reload", "Loads of a changed result key directory, by result (success, failure).", ["result"]
)
RESULT_KEYS_FAILING: Final = Gauge(
    "attest_result_keys_reload_failing",
    "1 while the result key directory cannot be loaded and the last good keys sign.", multiprocess_mode="livemax",
)


class MetricEvents:
    """The attestation step's reports (:class:`~attest_service.attestation.AttestationEvents`) as metrics."""

    def store_error(self, operation: str) -> None:
        """Count a failed store operation."""
        STORE_ERRORS.labels(operation=operation).inc()

    def nonce_accepted(self, *, challenge: bool) -> None:
        """Count an accepted nonce, challenge or caller-chosen."""
        (CHALLENGES_CONSUMED if challenge else CALLER_NONCES_ACCEPTED).inc()

    def challenge_issued(self) -> None:
        """Count an issued challenge."""
        CHALLENGES_ISSUED.inc()

    def result_issued(self, kid: str) -> None:
        """Count an attestation result by the ``kid`` of its key (a handful of keys at a time)."""
        child = _RESULT_CHILDREN.get(kid)
        if child is None:
            # A kid is a key of the operator's directory, never a caller's input: the labels stay few. The
            # children are remembered as the verification counters' are (labels() per request costs more).
            child = _RESULT_CHILDREN[kid] = RESULTS_ISSUED.labels(kid=kid)
        child.inc()

    def keys_reloaded(self, *, ok: bool) -> None:
        """Count a load of the changed result key directory; raise the failing gauge while it fails."""
        RESULT_KEY_RELOADS.labels(result="success" if ok else "failure").inc()
        RESULT_KEYS_FAILING.set(0 if ok else 1)


def record_verification(code: str | None) -> None:
    """Count one answer of ``/v1/verify``: ``code`` None when verified, else the error code."""
    child = _VERIFICATION_CHILDREN.get(code)
    if child is None:
        if code is None:
            child = VERIFICATIONS.labels(result="verified", code="none")
        elif code in ("internal_error", "store_unavailable"):
            child = VERIFICATIONS.labels(result="error", code=code)
        else:
            child = VERIFICATIONS.labels(result="refused", code=code)
        # Codes are the error classes' constants: the table is as small as the error hierarchy.
        _VERIFICATION_CHILDREN[code] = child
    child.inc()


def record_http_request(route: str, status: int) -> None:
    """Count one HTTP answer by route template (``unmatched`` for none) and status code."""
    key = (route, status)
    child = _HTTP_CHILDREN.get(key)
    if child is None:
        child = HTTP_REQUESTS.labels(route=route, status=str(status))
        # Route templates and status codes are the application's own: a bounded table.
        _HTTP_CHILDREN[key] = child
    child.inc()


# The labelled children, looked up once: labels() costs as much again as the increment itself, on every request.
_VERIFICATION_CHILDREN: Final[dict[str | None, Counter]] = {}
_RESULT_CHILDREN: Final[dict[str, Counter]] = {}
_HTTP_CHILDREN: Final[dict[tuple[str, int], Counter]] = {}


class _DefaultRegistryRemainder(Collector):
    """The default registry's families that the multiprocess files do not already provide.

    In multiprocess mode our own counters are also registered on the default registry, where they would
    report this worker's share only; their names are dropped so each family appears once.
    """

    def __init__(self, exclude: frozenset[str]) -> None:
        self._exclude = exclude

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name in self._exclude or any(sample.name in self._exclude for sample in family.samples):
                continue
            yield family


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every metric and its content type."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    names = frozenset(
        name for family in merged.collect() for name in (family.name, *(sample.name for sample in family.samples))
    )
    # Our own metrics are listed too: a family with no sample yet in any worker's file is still ours.
    names |= frozenset(_OWN_FAMILIES)
    merged.register(_DefaultRegistryRemainder(names))
    return generate_latest(merged), CONTENT_TYPE_LATEST


_OWN_FAMILIES: Final = ("attest_verifications", "attest_verification_duration_seconds", "attest_store_errors",
                        "attest_challenges_issued", "attest_challenges_consumed", "attest_caller_nonces_accepted",
                        "attest_http_requests", "attest_trust_reload", "attest_trust_reload_failing",
                        "attest_policy_reload", "attest_policy_reload_failing",
                        "attest_trust_problems", "attest_verifications_by_issuer", "attest_unpinned_issuer",
                        "attest_aia_fetch", "attest_revocation_unknown")
