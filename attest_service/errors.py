"""The one error hierarchy of attest-service.

Every failure the service can report is an :class:`AttestError` subclass carrying a stable ``code``
(the strings of the external contract). Domain code raises these; exactly one module
(:mod:`attest_service.web.errors`) maps them to HTTP statuses, and the CLI maps them to exit codes.
Foreign exceptions (asn1crypto, cryptography, json, redis, sqlite3) are wrapped where they enter,
with ``raise ... from exc``, so callers only ever see this family.
"""

from __future__ import annotations

from typing import ClassVar


class AttestError(Exception):
    """Base class: a failure with a stable machine-readable ``code`` and a human ``message``."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object used in JSON error bodies and CLI output."""
        return {"code": self.code, "message": self.message}


class ConfigurationError(AttestError):
    """A setting or file the operator supplied is invalid; raised at start-up, never per request."""

    code = "configuration_error"


# --- request-level errors -------------------------------------------------------------------------


class MalformedRequest(AttestError):
    """The request body is not JSON, or a field is missing or of the wrong type."""

    code = "malformed_request"


class Unauthorized(AttestError):
    """An API key is required and was missing or wrong."""

    code = "unauthorized"


class PolicyDenied(AttestError):
    """A genuine document falls outside the caller's allow-lists; the message names the rule."""

    code = "policy_denied"


class RequestTooLarge(AttestError):
    """The request body exceeds the size limit."""

    code = "request_too_large"


class RateLimited(AttestError):
    """The caller exceeded its request rate; ``retry_after`` is in whole seconds."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- nonce store errors ---------------------------------------------------------------------------


class NonceReplayed(AttestError):
    """The nonce was already accepted once; a document is never accepted twice."""

    code = "nonce_replayed"


class NonceUnknown(AttestError):
    """The policy requires a service-issued challenge and this nonce was never issued or has expired."""

    code = "nonce_unknown"


class StoreUnavailable(AttestError):
    """The nonce store cannot be reached; nothing is accepted without it (fail closed)."""

    code = "store_unavailable"


# --- document verification errors -----------------------------------------------------------------


class VerificationError(AttestError):
    """Base class of every reason an attested document is refused by the verification core."""

    code = "verification_failed"


class MalformedDocument(VerificationError):
    """Base64, DER, PKCS7 structure, content JSON or timestamps are unusable."""

    code = "malformed_document"


class UnsupportedDocument(VerificationError):
    """Well formed, but outside what is supported (algorithm, content type, detached content)."""

    code = "unsupported_document"


class SignatureInvalid(VerificationError):
    """The signature does not verify under the certificate the SignerInfo names."""

    code = "signature_invalid"


class UntrustedChain(VerificationError):
    """No path from the signer through pinned intermediates to a root of the cloud."""

    code = "untrusted_chain"


class CertificateExpired(VerificationError):
    """A path exists, but a certificate on it is outside its validity at the verification instant."""

    code = "certificate_expired"


class SubjectMismatch(VerificationError):
    """The signer's name is not the cloud's metadata domain or a subdomain of it."""

    code = "subject_mismatch"


class NonceMismatch(VerificationError):
    """The signed nonce differs from the expected one."""

    code = "nonce_mismatch"


class DocumentExpired(VerificationError):
    """The verification instant is past ``timeStamp.expiresOn`` beyond the allowed skew."""

    code = "document_expired"


class DocumentNotYetValid(VerificationError):
    """``timeStamp.createdOn`` lies in the future beyond the allowed skew."""

    code = "document_not_yet_valid"
