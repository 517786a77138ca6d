"""Attestation results: signed EAR tokens a relying party verifies offline, their keys, JWKS and discovery.

An accepted document (verified, admitted by the caller's allow-lists, its nonce claimed) yields a compact
JWS whose claims follow the EAR profile (draft-ietf-rats-ear): see :mod:`~attest_service.results.claims`.
:class:`ResultSigner` signs it with the key of ``ATTEST_RESULT_KEYS`` whose file name sorts last and
publishes every key as a JWK Set (:mod:`~attest_service.results.keys`); the service serves that set and an
OpenID discovery document under ``/.well-known/``.

JOSE library: joserfc. It builds on the ``cryptography`` package the service already uses for every
signature check (no second crypto stack), ships as a pure-Python wheel with no other dependency, is typed
(``py.typed``, so ``mypy --strict`` checks our calls), implements RFC 7638 thumbprints (our ``kid``) and
keeps an explicit allow-list of algorithms per registry, which is how ``alg`` stays fixed by the key.
PyJWT computes no RFC 7638 thumbprints; jwcrypto would do, but joserfc's typed API and its per-registry
allow-list of algorithms fit ``mypy --strict`` and a key-fixed ``alg`` best. The tests verify results with
PyJWT, a library independent of the one that signs.

Nothing here imports the web stack: a Python license server signs results in-process with
``Attestor(verifier, store, results=ResultSigner.from_directory(path))``.
"""

from __future__ import annotations

from attest_service.results.claims import EAR_PROFILE, DocumentJSON, result_claims, result_payload
from attest_service.results.keys import (
    ALGORITHMS,
    KeyFingerprint,
    KeySet,
    SigningKey,
    ensure_generated_key,
    key_fingerprint,
    load_keys,
    write_new_key,
)
from attest_service.results.signer import (
    DEFAULT_ISSUER,
    DISCOVERY_PATH,
    JWKS_PATH,
    KeyEvents,
    ResultSigner,
    SignedResult,
    check_issuer,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ISSUER",
    "DISCOVERY_PATH",
    "EAR_PROFILE",
    "JWKS_PATH",
    "DocumentJSON",
    "KeyEvents",
    "KeyFingerprint",
    "KeySet",
    "ResultSigner",
    "SignedResult",
    "SigningKey",
    "check_issuer",
    "ensure_generated_key",
    "key_fingerprint",
    "load_keys",
    "result_claims",
    "result_payload",
    "write_new_key",
]
