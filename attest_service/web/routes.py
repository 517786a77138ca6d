"""The routes of the REST API.

``POST /v1/verify`` is four steps: parse the request, call the verification core, claim the nonce, serialise.
The nonce is claimed only after the document verified and passed the caller's policy, so neither junk nor a
denied document can burn a nonce. Requests are checked in this order: size, key, rate, body.

Who is calling and how often (authentication, rate budgets, failed-authentication blocks) is decided in
:mod:`attest_service.callers.ratelimit`, shared with the direct WSGI path: the routes parse, call and serialise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from flask import Blueprint, Response, abort, jsonify, request

from attest_service.clouds import AUTO, CLOUDS
from attest_service.errors import AttestError, StoreUnavailable
from attest_service.nonces.failures import store_errors_reported
from attest_service.results import DISCOVERY_PATH, JWKS_PATH, ResultSigner
from attest_service.verify import MAX_NONCE_LENGTH, decode
from attest_service.verify.strictjson import strict_decoder
from attest_service.web import metrics
from attest_service.web.errors import MalformedRequest, json_answer, json_bytes
from attest_service.web.openapi import openapi_document
from attest_service.web.service import Service, current_service

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: What ``/readyz`` says when the store does not answer (the detail is logged, never answered).
READYZ_UNAVAILABLE_MESSAGE: Final = "the nonce store does not answer"
#: The verification route.
VERIFY_PATH: Final = "/v1/verify"
#: Keys a verify request may carry.
VERIFY_KEYS: Final = frozenset({"document", "signature", "nonce", "cloud"})
#: How long relying parties may cache the JWK Set and the discovery document: a new key is published this
#: long (at least) before it signs, by the rotation runbook (docs/OPERATIONS.md).
KEYS_CACHE_CONTROL: Final = "public, max-age=300"

api = Blueprint("api", __name__)
_LOG: Final = logging.getLogger(__name__)


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


_BODY_DECODER: Final = strict_decoder(MalformedRequest, "request body")


def json_object(data: bytes) -> dict[str, object]:
    """The request body as a JSON object; raises MalformedRequest when it is not one (strictly parsed)."""
    try:
        body = _BODY_DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MalformedRequest):
            raise
        raise MalformedRequest("the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise MalformedRequest("the request body is not a JSON object")
    return body


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyRequest:
    """A parsed ``POST /v1/verify`` body: the DER document, the expected nonce and the cloud."""

    document: bytes
    nonce: str | None
    cloud: str


def parse_verify_request(body: dict[str, object],
                         decode: Callable[[Mapping[str, object]], bytes] = decode) -> VerifyRequest:
    """Check the body's shape; raise MalformedRequest, or MalformedDocument when the base64 is unusable.

    ``decode`` turns the IMDS response object into DER (the attestation step's, which has the verifier's
    caches); a bare ``signature`` is decoded as the response object carrying it.
    """
    unknown = set(body) - VERIFY_KEYS
    if unknown:
        raise MalformedRequest(f"unknown field(s): {', '.join(sorted(name[:40] for name in unknown))}")
    if ("document" in body) == ("signature" in body):
        raise MalformedRequest("give exactly one of 'document' (the IMDS response object) and 'signature'")
    nonce = body.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or not 1 <= len(nonce) <= MAX_NONCE_LENGTH):
        raise MalformedRequest(f"'nonce' must be a string of 1 to {MAX_NONCE_LENGTH} characters")
    cloud = body.get("cloud", AUTO)
    if not isinstance(cloud, str) or (cloud != AUTO and cloud not in CLOUDS):
        raise MalformedRequest(f"'cloud' must be one of {', '.join([*CLOUDS, AUTO])}")
    if "document" in body:
        document = body["document"]
        if not isinstance(document, dict):
            raise MalformedRequest("'document' must be the IMDS response object {\"encoding\", \"signature\"}")
        der = decode(document)
    else:
        signature = body["signature"]
        if not isinstance(signature, str):
            raise MalformedRequest("'signature' must be a base64 string")
        der = decode({"encoding": "pkcs7", "signature": signature})
    return VerifyRequest(document=der, nonce=nonce, cloud=cloud)


def verification_body(service: Service, environ: WSGIEnvironment) -> bytes:
    """Answer one ``POST /v1/verify``: the success body as JSON bytes; raises AttestError for every refusal.

    The whole of the route but the HTTP envelope, shared by the Flask view and the direct WSGI path
    (:mod:`attest_service.web.fastpath`): ``environ`` gives the headers, the peer and the body, which is
    read through the service's body gate (:mod:`attest_service.web.body`). The metrics of the verification
    are recorded here, whichever the outcome.
    """
    started = time.perf_counter()
    code: str | None = "internal_error"
    try:
        caller = service.admission.caller(environ)
        # Parse the request.
        parsed = parse_verify_request(json_object(service.bodies.read(environ, caller.source)),
                                      service.attestor.verifier.decode)
        # Attest: verify with the core, apply the caller's allow-lists and
        # only then claim the nonce (attestation.py), at the service's instant.
        attested = service.attestor.attest_der(parsed.document, at=service.clock(), nonce=parsed.nonce,
                                               cloud=parsed.cloud, caller=caller.policy)
        # Serialise the verdict.
        body = attested.to_json()
    except AttestError as exc:
        code = exc.code
        raise
    else:
        code = None
        return body
    finally:
        metrics.record_verification(code)
        metrics.VERIFICATION_SECONDS.observe(time.perf_counter() - started)


@api.post(VERIFY_PATH)
def verify() -> Response:
    """Verify an attested document and accept its nonce once."""
    return json_answer(verification_body(current_service(), request.environ))


@api.post("/v1/challenges")
def issue_challenge() -> tuple[Response, int]:
    """Issue a single-use nonce for the caller to have IMDS sign."""
    service = current_service()
    caller = service.admission.caller(request.environ)
    service.admission.challenge(caller)
    challenge = service.attestor.issue_challenge(client_id=caller.client_id, at=service.clock())
    return jsonify({"nonce": challenge.nonce, "expiresAt": _iso(challenge.expires_at)}), 201


@api.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: the nonce store answers; without it nothing can be accepted."""
    service = current_service()
    try:
        with store_errors_reported(service.events, "ping"):
            service.store.ping()
    except StoreUnavailable as exc:
        # The route is unauthenticated and the detail names hosts, paths and driver errors: like every other
        # answer, it gets the stable code only, and the operator's log gets the detail.
        _LOG.warning("readiness: nonce store unavailable: %s", exc.message)
        return jsonify({"status": "unavailable",
                        "error": {"code": exc.code, "message": READYZ_UNAVAILABLE_MESSAGE}}), 503
    return jsonify({"status": "ready"}), 200


@api.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus text exposition of every metric."""
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


def _results() -> ResultSigner:
    signer = current_service().attestor.results
    if signer is None:
        abort(404, description="attestation results are off (ATTEST_RESULT_KEYS)")
    return signer


@api.get(JWKS_PATH)
def jwks() -> Response:
    """The public keys that sign attestation results, as a JWK Set."""
    response = Response(json_bytes(_results().jwks()), content_type="application/jwk-set+json")
    response.headers["Cache-Control"] = KEYS_CACHE_CONTROL
    return response


@api.get(DISCOVERY_PATH)
def openid_configuration() -> Response:
    """The OpenID discovery document of attestation results (issuer, jwks_uri, algorithms, claims)."""
    response = jsonify(_results().discovery())
    response.headers["Cache-Control"] = KEYS_CACHE_CONTROL
    return response


@api.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 description of this API."""
    return jsonify(openapi_document())
