"""The OpenAPI 3.1 description of the REST API, served at ``/openapi.json``.

Built from the same tables the service uses (the error-status map, the cloud names, the nonce limit), so
the description cannot drift from the behaviour; a schemathesis test checks live answers against it.
"""

from __future__ import annotations

import functools
from typing import Final

from attest_service import __version__
from attest_service.clouds import AUTO, CLOUDS
from attest_service.results import ALGORITHMS, DISCOVERY_PATH, JWKS_PATH
from attest_service.verify import MAX_NONCE_LENGTH
from attest_service.web.errors import STATUS_BY_CODE

_JSON: Final = "application/json"

#: Human descriptions of the statuses, for the response objects.
_STATUS_TEXT: Final = {
    400: "malformed_request: body not JSON, fields missing, unknown or of the wrong type",
    401: "unauthorized: API key missing or wrong (WWW-Authenticate: Bearer)",
    403: "policy_denied: a genuine document outside the caller's allow-lists",
    408: "request_timeout: the body did not arrive in full within ATTEST_BODY_TIMEOUT_SECONDS (then the "
         "connection is closed)",
    409: "nonce_replayed: the nonce was already accepted",
    413: "request_too_large: body over 1 MiB",
    422: "the document was refused; the code says why",
    429: "rate_limited: too many requests (Retry-After gives the seconds to wait)",
    503: "store_unavailable: the nonce store cannot be reached; nothing is accepted. service_busy: the worker "
         "already holds its limit of request bodies being read (Retry-After gives the seconds to wait)",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(status: int) -> dict[str, object]:
    codes = sorted(code for code, code_status in STATUS_BY_CODE.items() if code_status == status)
    schema: dict[str, object] = {
        "allOf": [_ref("Error"), {"properties": {"error": {"properties": {"code": {"enum": codes}}}}}],
    }
    response: dict[str, object] = {"description": _STATUS_TEXT[status], "content": {_JSON: {"schema": schema}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}
    if status == 429:
        response["headers"] = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"},
                                               "required": True}}
    return response


def _schemas() -> dict[str, object]:
    return {
        "Error": {
            "type": "object",
            "required": ["verified", "error"],
            "properties": {
                "verified": {"const": False},
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": sorted(STATUS_BY_CODE)},
                        "message": {"type": "string"},
                    },
                },
            },
        },
        "ImdsResponse": {
            "type": "object",
            "description": "The body IMDS returns from /metadata/attested/document.",
            "required": ["encoding", "signature"],
            "properties": {"encoding": {"type": "string", "const": "pkcs7"}, "signature": {"type": "string"}},
        },
        "VerifyRequest": {
            "type": "object",
            "description": "Exactly one of document and signature.",
            "additionalProperties": False,
            "properties": {
                "document": _ref("ImdsResponse"),
                "signature": {"type": "string", "description": "base64 PKCS7, as in the IMDS response"},
                "nonce": {"type": "string", "minLength": 1, "maxLength": MAX_NONCE_LENGTH,
                          "description": "the nonce the document must carry (a challenge, or the caller's own)"},
                "cloud": {"type": "string", "enum": [*CLOUDS, AUTO], "default": AUTO},
            },
            "oneOf": [{"required": ["document"]}, {"required": ["signature"]}],
        },
        "Verified": {
            "type": "object",
            "required": ["verified", "cloud", "claims", "signer", "nonce"],
            "properties": {
                "verified": {"const": True},
                "cloud": {"type": "string", "enum": list(CLOUDS)},
                "claims": {"type": "object", "description": "the signed JSON exactly as signed"},
                "signer": {"type": "object"},
                "token": {"type": "string", "pattern": r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
                          "description": "the attestation result: a compact JWS (EAR claims), verifiable offline "
                                         "against /.well-known/jwks.json; present when results are on"},
                "nonce": {
                    "type": "object",
                    "required": ["value", "checked", "challenge"],
                    "properties": {
                        "value": {"type": "string"},
                        "checked": {"type": "boolean", "description": "the request named the expected nonce"},
                        "challenge": {"type": "boolean", "description": "a service-issued challenge was consumed"},
                    },
                },
            },
        },
        "Challenge": {
            "type": "object",
            "required": ["nonce", "expiresAt"],
            "properties": {
                "nonce": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"},
                "expiresAt": {"type": "string", "format": "date-time"},
            },
        },
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "JwkSet": {
            "type": "object",
            "required": ["keys"],
            "properties": {"keys": {"type": "array", "items": {
                "type": "object",
                "required": ["kty", "kid", "alg", "use"],
                "properties": {"kty": {"enum": ["EC", "RSA", "OKP"]}, "kid": {"type": "string"},
                               "alg": {"enum": list(ALGORITHMS)}, "use": {"const": "sig"}},
            }}},
        },
        "OpenIdConfiguration": {
            "type": "object",
            "required": ["issuer", "jwks_uri", "id_token_signing_alg_values_supported", "subject_types_supported",
                         "response_types_supported", "claims_supported"],
            "properties": {
                "issuer": {"type": "string", "format": "uri"},
                "jwks_uri": {"type": "string", "format": "uri"},
                "id_token_signing_alg_values_supported": {"type": "array", "items": {"enum": list(ALGORITHMS)}},
                "subject_types_supported": {"type": "array", "items": {"type": "string"}},
                "response_types_supported": {"type": "array", "items": {"type": "string"}},
                "claims_supported": {"type": "array", "items": {"type": "string"}},
            },
        },
    }


def _keys_route(operation: str, summary: str, schema: str, content_type: str) -> dict[str, object]:
    return {"get": {"operationId": operation, "summary": summary, "responses": {
        "200": {"description": "cacheable (Cache-Control: public, max-age=300)",
                "content": {content_type: {"schema": _ref(schema)}}},
        "404": {"description": "not_found: attestation results are off",
                "content": {_JSON: {"schema": _ref("Error")}}},
    }}}


@functools.cache
def openapi_document() -> dict[str, object]:
    """The OpenAPI 3.1 document (built once; callers must not modify it)."""
    guarded: list[dict[str, list[str]]] = [{"bearer": []}, {}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "attest-service",
            "version": __version__,
            "description": "Verifies Azure IMDS attested documents and accepts each nonce once.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "required when ATTEST_API_KEYS is set"}},
        },
        "paths": {
            "/v1/challenges": {
                "post": {
                    "operationId": "issueChallenge",
                    "summary": "Issue a single-use nonce for IMDS to sign",
                    "security": guarded,
                    "responses": {
                        "201": {"description": "a new challenge",
                                "content": {_JSON: {"schema": _ref("Challenge")}}},
                        **{str(status): _error_response(status) for status in (401, 429, 503)},
                    },
                },
            },
            "/v1/verify": {
                "post": {
                    "operationId": "verifyDocument",
                    "summary": "Verify an attested document and accept its nonce once",
                    "security": guarded,
                    "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("VerifyRequest")}}},
                    "responses": {
                        "200": {"description": "the document is genuine and its nonce was accepted",
                                "content": {_JSON: {"schema": _ref("Verified")}}},
                        **{str(status): _error_response(status)
                           for status in (400, 401, 403, 408, 409, 413, 422, 429, 503)},
                    },
                },
            },
            "/healthz": {"get": {"operationId": "health", "summary": "Liveness", "responses": {
                "200": {"description": "the process serves", "content": {_JSON: {"schema": _ref("Status")}}}}}},
            "/readyz": {"get": {"operationId": "ready", "summary": "Readiness: the nonce store answers", "responses": {
                "200": {"description": "ready", "content": {_JSON: {"schema": _ref("Status")}}},
                "503": {"description": "the nonce store does not answer",
                        "content": {_JSON: {"schema": _ref("Status")}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            JWKS_PATH: _keys_route("jwks", "The public keys of attestation results (JWK Set)", "JwkSet",
                                   "application/jwk-set+json"),
            DISCOVERY_PATH: _keys_route("openidConfiguration", "OpenID discovery of attestation results",
                                        "OpenIdConfiguration", _JSON),
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {"type": "object"}}}}}}},
        },
    }
