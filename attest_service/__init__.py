"""attest-service: verify Azure Instance Metadata Service attested documents, once per nonce.

The public library, for Python applications that verify in-process (README, "The library")::

    from attest_service import AttestError, VerificationError, Verifier

    verifier = Verifier.bundled()
    result = verifier.verify_response(response, cloud="auto", nonce=None, at=None)

and, for the once-only guarantee without the web service, an :class:`Attestor` over a nonce store::

    from attest_service import Attestor, CallerPolicy, open_store

    attestor = Attestor(verifier, open_store("sqlite:///var/lib/license/nonces.sqlite3"))
    attested = attestor.attest(response, nonce=challenge.nonce, caller=CallerPolicy(client_id="app"), at=None)

and, for attestation results that relying parties verify offline (a signed EAR token, ``attested.token``)::

    from attest_service import ResultSigner

    attestor = Attestor(verifier, store, results=ResultSigner.from_directory("/etc/license/result-keys"))

Everything not named here is the service's own and may change between releases. Importing this package
loads neither the web stack (Flask, gunicorn) nor a store backend (redis, sqlite3): those load on use.
"""

from attest_service.attestation import Attested, Attestor, Challenge
from attest_service.callers.policy import CallerPolicy, Plan
from attest_service.errors import (
    AttestError,
    ConfigurationError,
    NonceReplayed,
    NonceUnknown,
    PolicyDenied,
    RateLimited,
    StoreUnavailable,
    VerificationError,
)
from attest_service.library import Verifier
from attest_service.nonces import NonceStore, open_store
from attest_service.results import ResultSigner
from attest_service.verify import Signer, VerifiedDocument

__version__ = "0.1.0"

__all__ = [
    "AttestError",
    "Attested",
    "Attestor",
    "CallerPolicy",
    "Challenge",
    "ConfigurationError",
    "NonceReplayed",
    "NonceStore",
    "NonceUnknown",
    "Plan",
    "PolicyDenied",
    "RateLimited",
    "ResultSigner",
    "Signer",
    "StoreUnavailable",
    "VerificationError",
    "VerifiedDocument",
    "Verifier",
    "__version__",
    "open_store",
]
