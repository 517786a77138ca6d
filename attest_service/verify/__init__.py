"""The pure verification core; see :mod:`attest_service.verify.verifier` for the algorithm."""

from attest_service.verify.document import decode_document, decode_response, decode_signature
from attest_service.verify.verifier import (
    Signer,
    VerificationPolicy,
    VerifiedDocument,
    Verifier,
    verify_document,
)

__all__ = [
    "Signer",
    "VerificationPolicy",
    "VerifiedDocument",
    "Verifier",
    "decode_document",
    "decode_response",
    "decode_signature",
    "verify_document",
]
