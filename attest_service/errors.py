"""The one error hierarchy of attest-service.

Every failure the service can report is an :class:`AttestError` subclass carrying, as class attributes, its
stable ``code`` (the strings of the external contract), the HTTP ``http_status`` the REST service answers
with, and, for refusals of a document, the ``step`` of the verification algorithm
(:mod:`attest_service.verify.verifier`) that stops it. Domain code raises these and never sees HTTP;
:mod:`attest_service.web.errors` turns them into answers (and adds the errors only HTTP has: malformed,
slow and oversized requests, a busy service), and the CLI maps them to exit codes.
Foreign exceptions (asn1crypto, cryptography, json, redis, sqlite3) are wrapped where they enter,
with ``raise ... from exc``, so callers only ever see this family.
"""

from __future__ import annotations

from typing import ClassVar


class AttestError(Exception):
    """Base class: a failure with a stable machine-readable ``code`` and a human ``message``."""

    code: ClassVar[str] = "internal_error"
    #: The HTTP status of this code (the contract's table); 500 only for failures that are bugs at request time.
    http_status: ClassVar[int] = 500
    #: The step of the algorithm (verifier.py's numbering) a document fails at, where the code has one.
    step: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` object used in JSON error bodies and CLI output."""
        return {"code": self.code, "message": self.message}


class ConfigurationError(AttestError):
    """A setting or file the operator supplied is invalid; raised at start-up, never per request."""

    code = "configuration_error"
    # Never answered over HTTP: a configuration error at request time is a bug (500, logged).


# --- errors of the caller: its key, its allow-lists and its rate --------------------------------------


class Unauthorized(AttestError):
    """An API key is required and was missing or wrong."""

    code = "unauthorized"
    http_status = 401


class PolicyDenied(AttestError):
    """A genuine document falls outside the caller's allow-lists; the message names the rule."""

    code = "policy_denied"
    http_status = 403


class RateLimited(AttestError):
    """The caller exceeded its request rate; ``retry_after`` is in whole seconds."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- nonce store errors ---------------------------------------------------------------------------


class NonceReplayed(AttestError):
    """The nonce was already accepted once; a document is never accepted twice."""

    code = "nonce_replayed"
    http_status = 409
    step = "10 claim the nonce (the caller's step)"


class NonceUnknown(AttestError):
    """The policy requires a service-issued challenge and this nonce was never issued or has expired."""

    code = "nonce_unknown"
    http_status = 422
    step = "10 claim the nonce (the caller's step)"


class StoreUnavailable(AttestError):
    """The nonce store cannot be reached; nothing is accepted without it (fail closed)."""

    code = "store_unavailable"
    http_status = 503
    step = "10 claim the nonce (the caller's step)"


# --- document verification errors -----------------------------------------------------------------


class VerificationError(AttestError):
    """Base class of every reason an attested document is refused by the verification core."""

    code = "verification_failed"
    http_status = 422


class MalformedDocument(VerificationError):
    """Base64, DER, PKCS7 structure, content JSON or timestamps are unusable."""

    code = "malformed_document"
    http_status = 422
    step = "1-2 decode and parse (base64, DER, PKCS7) or 7 claims"


class UnsupportedDocument(VerificationError):
    """Well formed, but outside what is supported (algorithm, content type, detached content)."""

    code = "unsupported_document"
    http_status = 422
    step = "2 parse: outside what is supported"


class SignatureInvalid(VerificationError):
    """The signature does not verify under the certificate the SignerInfo names."""

    code = "signature_invalid"
    http_status = 422
    step = "4 signature"


class UntrustedChain(VerificationError):
    """No path from the signer through pinned intermediates to a root of the cloud."""

    code = "untrusted_chain"
    http_status = 422
    step = "6 chain to a pinned root"


class CertificateExpired(VerificationError):
    """A path exists, but a certificate on it is outside its validity at the verification instant."""

    code = "certificate_expired"
    http_status = 422
    step = "6 chain: validity at the instant"


class CertificateRevoked(VerificationError):
    """A current CRL of the trust directory lists the signer or a CA on its path."""

    code = "certificate_revoked"
    http_status = 422
    step = "6 chain: revocation (CRLs)"


class RevocationUnknown(VerificationError):
    """Hard revocation only: no current CRL of the trust directory covers a certificate on the path."""

    code = "revocation_unknown"
    http_status = 422
    step = "6 chain: revocation (CRLs)"


class SubjectMismatch(VerificationError):
    """The signer's name is not the cloud's metadata domain or a subdomain of it."""

    code = "subject_mismatch"
    http_status = 422
    step = "5 signer name"


class NonceMismatch(VerificationError):
    """The signed nonce differs from the expected one.

    ``signed_nonce`` is the nonce the document carries, set by the verification core only: step 9 is its
    last, so the document was otherwise genuine and its nonce can be told to the caller without verifying it
    again (a second pass would count the refused document as a verified one).
    """

    code = "nonce_mismatch"
    http_status = 422
    step = "9 nonce"

    def __init__(self, message: str, *, signed_nonce: str | None = None) -> None:
        super().__init__(message)
        self.signed_nonce = signed_nonce


class DocumentExpired(VerificationError):
    """The verification instant is past ``timeStamp.expiresOn`` beyond the allowed skew."""

    code = "document_expired"
    http_status = 422
    step = "8 validity window (expiresOn)"


class DocumentNotYetValid(VerificationError):
    """``timeStamp.createdOn`` lies in the future beyond the allowed skew."""

    code = "document_not_yet_valid"
    http_status = 422
    step = "8 validity window (createdOn)"


def step_of(error: AttestError) -> str:
    """The algorithm step ``error`` stops at, or its code when it has no step (for explanations)."""
    return error.step if error.step is not None else error.code
