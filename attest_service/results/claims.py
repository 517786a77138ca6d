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
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
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


def audience(caller: CallerPolicy) -> str:
    """The ``aud`` of ``caller``'s results: its client id, ``anonymous`` for a keyless caller."""
    return ANONYMOUS_AUDIENCE if caller.client_id == ANONYMOUS else caller.client_id


@functools.lru_cache(maxsize=1024)
def policy_id(caller: CallerPolicy) -> str:
    """``clients/<id>@sha256:<16 hex>`` (or ``anonymous@...``): which allow-lists admitted the document."""
    lists = {
        "clouds": caller.clouds, "subscriptions": caller.subscriptions, "skus": caller.skus,
        "license_types": caller.license_types, "require_challenge": caller.require_challenge,
        "plans": None if caller.plans is None else sorted(plan.describe() for plan in caller.plans),
    }
    canonical = json.dumps({key: sorted(value) if isinstance(value, frozenset) else value
                            for key, value in lists.items()}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    name = ANONYMOUS_AUDIENCE if caller.client_id == ANONYMOUS else f"clients/{caller.client_id}"
    return f"{name}@sha256:{digest}"


def result_claims(document: VerifiedDocument, *, caller: CallerPolicy, issuer: str, at: datetime,
                  ttl: timedelta, verifier_build: str) -> dict[str, object]:
    """The claim set of the result for ``document``, accepted for ``caller`` at ``at``."""
    issued = int(at.timestamp())
    answer = document.to_dict()
    return {
        "iss": issuer,
        "sub": document.claims.vm_id,
        "aud": audience(caller),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl.total_seconds()),
        "jti": secrets.token_urlsafe(16),
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
