"""The claims of an attestation result (EAR, draft-ietf-rats-ear), built from an accepted document.

A pure function of what was accepted, the caller, the issuer and the instant: no key, no I/O. The claim
set is exactly the contract's ("Attestation results"):

- ``iss``, ``sub`` (the signed ``vmId``), ``aud`` (the caller's client id, ``anonymous`` for a keyless
  caller), ``iat``/``nbf``/``exp``, ``jti``;
- ``eat_profile`` (the EAR profile), ``eat_nonce`` (the signed nonce), ``ear.verifier-id``;
- ``submods.azure-imds``: ``ear.status: affirming``, the trustworthiness vector (``instance-identity: 2``,
  "affirming": the instance is the one Azure signed for) and the caller's appraisal policy id;
- ``azure``: the cloud, the signed JSON exactly as signed, and the signer as the verify answer has it.

The appraisal policy id names the allow-lists the document was admitted by: ``clients/<id>`` or
``anonymous``, with the SHA-256 of those allow-lists, so a relying party can tell two policies of the same
caller apart (``clients/license-server@sha256:<16 hex>``).

:func:`result_claims` is the claim set as a dict; :func:`result_payload` is the same claims as the JSON text
that is signed, assembled from parts each encoded by the one JSON encoder: the document's claims and signer
come encoded once per request (:class:`DocumentJSON`, shared with the verify answer), the claims fixed per
caller are encoded once per caller, and only the per-result values are encoded per result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from attest_service.callers.policy import ANONYMOUS, CallerPolicy
from attest_service.verify import VerifiedDocument

#: The EAR profile (draft-ietf-rats-ear, section 3).
EAR_PROFILE: Final = "tag:github.com,2023:veraison/ear"
#: The submodule of the result: Azure IMDS attested data.
SUBMODULE: Final = "azure-imds"
#: The audience of a keyless caller's results.
ANONYMOUS_AUDIENCE: Final = "anonymous"
#: EAR trustworthiness claim value 2: "affirming" (draft-ietf-rats-ar4si, section 2.3.2).
AFFIRMING: Final = 2
#: Every claim of a result, as the discovery document lists them.
CLAIMS: Final = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "eat_profile", "eat_nonce", "ear.verifier-id",
                 "submods", "azure")
#: The JSON of results and answers: compact and ASCII (non-ASCII escaped), as the API writes every body.
JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class DocumentJSON:
    """An accepted document's JSON-ready answer and the JSON text of its ``claims`` and ``signer``.

    The verify answer and the attestation result both carry the document's claims and signer: built once
    per request (:meth:`of`), they are encoded once and the same text goes into both.
    """

    #: :meth:`VerifiedDocument.to_dict <attest_service.verify.VerifiedDocument.to_dict>`; not to be mutated.
    answer: dict[str, object]
    #: ``answer["claims"]`` as JSON text.
    claims: str
    #: ``answer["signer"]`` as JSON text.
    signer: str

    @classmethod
    def of(cls, document: VerifiedDocument) -> DocumentJSON:
        """The answer of ``document`` and its claims and signer encoded."""
        answer = document.to_dict()
        return cls(answer, JSON_ENCODER.encode(answer["claims"]), JSON_ENCODER.encode(answer["signer"]))


def audience(caller: CallerPolicy) -> str:
    """The ``aud`` of ``caller``'s results: its client id, ``anonymous`` for a keyless caller."""
    return ANONYMOUS_AUDIENCE if caller.client_id == ANONYMOUS else caller.client_id


@functools.lru_cache(maxsize=1024)
def policy_id(caller: CallerPolicy) -> str:
    """``clients/<id>@sha256:<16 hex>`` (or ``anonymous@...``): which allow-lists admitted the document."""
    lists = {
        "clouds": caller.clouds, "subscriptions": caller.subscriptions, "skus": caller.skus,
        "license_types": caller.license_types, "require_challenge": caller.require_challenge,
        # Each plan as its three fields, not describe()'s "a/b/c": a "/" inside a field must not make two
        # different allow-lists one id.
        "plans": None if caller.plans is None else sorted([plan.publisher, plan.product, plan.name]
                                                          for plan in caller.plans),
    }
    canonical = json.dumps({key: sorted(value) if isinstance(value, frozenset) else value
                            for key, value in lists.items()}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    name = ANONYMOUS_AUDIENCE if caller.client_id == ANONYMOUS else f"clients/{caller.client_id}"
    return f"{name}@sha256:{digest}"


def result_claims(document: VerifiedDocument, *, caller: CallerPolicy, issuer: str, at: datetime,
                  ttl: timedelta, verifier_build: str, jti: str | None = None) -> dict[str, object]:
    """The claim set of the result for ``document``, accepted for ``caller`` at ``at``.

    ``jti`` is the result's id (default: 128 random bits, base64url).
    """
    issued = int(at.timestamp())
    answer = document.to_dict()
    return {
        "iss": issuer,
        "sub": document.claims.vm_id,
        "aud": audience(caller),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl.total_seconds()),
        "jti": secrets.token_urlsafe(16) if jti is None else jti,
        "eat_profile": EAR_PROFILE,
        "eat_nonce": document.claims.nonce,
        "ear.verifier-id": {"developer": "attest-service", "build": verifier_build},
        "submods": {SUBMODULE: {
            "ear.status": "affirming",
            "ear.trustworthiness-vector": {"instance-identity": AFFIRMING},
            "ear.appraisal-policy-id": policy_id(caller),
        }},
        "azure": {"cloud": document.cloud, "claims": answer["claims"], "signer": answer["signer"]},
    }


@functools.lru_cache(maxsize=1024)
def _fixed_claims(caller: CallerPolicy, issuer: str, verifier_build: str) -> str:
    """The claims that are the same in every result of ``caller``, as JSON members (leading comma)."""
    fixed = {
        "iss": issuer,
        "aud": audience(caller),
        "eat_profile": EAR_PROFILE,
        "ear.verifier-id": {"developer": "attest-service", "build": verifier_build},
        "submods": {SUBMODULE: {
            "ear.status": "affirming",
            "ear.trustworthiness-vector": {"instance-identity": AFFIRMING},
            "ear.appraisal-policy-id": policy_id(caller),
        }},
    }
    return "," + JSON_ENCODER.encode(fixed)[1:-1]


def result_payload(document: VerifiedDocument, *, caller: CallerPolicy, issuer: str, at: datetime,
                   ttl_seconds: int, verifier_build: str, shared: DocumentJSON | None = None,
                   jti: str | None = None) -> bytes:
    """:func:`result_claims` as the JSON bytes that are signed (compact, ASCII; the same claims and values).

    ``shared`` is ``document``'s :class:`DocumentJSON` when the caller built it already (the verify answer
    does). Every string is written by :data:`JSON_ENCODER` (so escaped as any other); the parts are joined
    as members of one object, whose names are fixed and distinct.
    """
    if shared is None:
        shared = DocumentJSON.of(document)
    issued = int(at.timestamp())
    encode = JSON_ENCODER.encode
    jti = secrets.token_urlsafe(16) if jti is None else jti
    text = (f'{{"sub":{encode(document.claims.vm_id)},"iat":{issued},"nbf":{issued},"exp":{issued + ttl_seconds},'
            f'"jti":{encode(jti)},"eat_nonce":{encode(document.claims.nonce)}'
            f'{_fixed_claims(caller, issuer, verifier_build)},'
            f'"azure":{{"cloud":{encode(document.cloud)},"claims":{shared.claims},"signer":{shared.signer}}}}}')
    return text.encode("ascii")
