"""The pinned trust: loading it from a directory, operating on the pins, reloading it live, the AIA fallback.

- :mod:`~attest_service.trust.loading`: read a pinned directory (and certifi's roots) into the core's
  :class:`~attest_service.verify.TrustStore`; find the pins bundled with the package.
- :mod:`~attest_service.trust.certificates`: x509 helpers shared by the operations below (CA tests, CA
  path validation, AIA URLs).
- :mod:`~attest_service.trust.pins`: list, check, add and remove pins (the ``certs`` command's library).
- :mod:`~attest_service.trust.explain`: which step a document fails and what the trust lacks.
- :mod:`~attest_service.trust.reload`: the running service's verifier that reloads the pinned directory
  (:class:`~attest_service.trust.reload.ReloadingVerifier`).
- :mod:`~attest_service.trust.aia`: what a refusal at an unpinned issuer goes through, and the optional
  fallback that fetches that issuer from an allow-listed AIA URL.
- :mod:`~attest_service.trust.fetched`: the CAs pinned by fingerprint, fetched in the background.
- :mod:`~attest_service.trust.metrics`: the trust's metrics (reloads, issuers, pin expiry).

This package imports only the loading names below: the offline commands and the library never pull in the
service's runtime (the reloading verifier, the AIA fallback and the metrics load Prometheus).
"""

from attest_service.trust.loading import (
    CERTIFI_LIST,
    MANIFEST,
    MAX_PEM_BYTES,
    PINNED_CERTS_ENV,
    bundled_pinned_dir,
    load_certificates,
    load_trust,
    manifest_entry,
    pinned_dir_from_env,
)
from attest_service.verify import CloudTrust, PinnedCertificate, TrustStore, common_name, fingerprint

__all__ = [
    "CERTIFI_LIST",
    "MANIFEST",
    "MAX_PEM_BYTES",
    "PINNED_CERTS_ENV",
    "CloudTrust",
    "PinnedCertificate",
    "TrustStore",
    "bundled_pinned_dir",
    "common_name",
    "fingerprint",
    "load_certificates",
    "load_trust",
    "manifest_entry",
    "pinned_dir_from_env",
]
