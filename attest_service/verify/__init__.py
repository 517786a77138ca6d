"""The pure verification core; see :mod:`attest_service.verify.verifier` for the algorithm.

Everything here is a function of its arguments: bytes, options, the trust model and an instant. The
package imports nothing of attest-service but :mod:`attest_service.errors` and :mod:`attest_service.clouds`
(a test walks the imports to keep it so); loading trust from files is :mod:`attest_service.trust`'s work.
The names below are the core's interface to the rest of the package.
"""

from attest_service.verify.chain import CA_POLICY, MAX_INTERMEDIATES
from attest_service.verify.document import MAX_SIGNATURE_CHARS, decode
from attest_service.verify.instant import aware_instant
from attest_service.verify.names import cloud_for_signer
from attest_service.verify.revocation import (
    DEFAULT_REVOCATION,
    REVOCATION_MODES,
    RevocationList,
    RevocationMode,
    revocation_mode,
)
from attest_service.verify.strictjson import strict_decoder
from attest_service.verify.trust import (
    CloudTrust,
    DigestAlgorithm,
    FingerprintPin,
    PinnedCertificate,
    Role,
    TrustStore,
    common_name,
    digests,
    fingerprint,
)
from attest_service.verify.verifier import (
    DEFAULT_CLOCK_SKEW,
    MAX_NONCE_LENGTH,
    DocumentVerifier,
    Signer,
    VerificationPolicy,
    VerifiedDocument,
    carried_certificates,
    signer_certificate,
    verify_document,
)

__all__ = [
    "CA_POLICY",
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_REVOCATION",
    "MAX_INTERMEDIATES",
    "MAX_NONCE_LENGTH",
    "MAX_SIGNATURE_CHARS",
    "REVOCATION_MODES",
    "CloudTrust",
    "DigestAlgorithm",
    "DocumentVerifier",
    "FingerprintPin",
    "PinnedCertificate",
    "RevocationList",
    "RevocationMode",
    "Role",
    "Signer",
    "TrustStore",
    "VerificationPolicy",
    "VerifiedDocument",
    "aware_instant",
    "carried_certificates",
    "cloud_for_signer",
    "common_name",
    "decode",
    "digests",
    "fingerprint",
    "revocation_mode",
    "signer_certificate",
    "strict_decoder",
    "verify_document",
]
