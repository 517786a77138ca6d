"""The one mapping from errors to HTTP: status codes, headers and ``{"verified": false, "error": ...}`` bodies.

Domain code raises :class:`~attest_service.errors.AttestError` subclasses and never sees HTTP; werkzeug's own
exceptions (unknown route, wrong method, oversized body) are translated here too, so every answer that is
not a success has the same JSON shape.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Final

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from attest_service.errors import AttestError, MalformedRequest, RateLimited, RequestTooLarge, StoreUnavailable

_LOG: Final = logging.getLogger(__name__)

#: HTTP status of every error code the API can answer (the contract's table, plus the last-resort 500).
STATUS_BY_CODE: Final = MappingProxyType({
    "malformed_request": 400,
    "unauthorized": 401,
    "policy_denied": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "nonce_replayed": 409,
    "request_too_large": 413,
    "malformed_document": 422,
    "unsupported_document": 422,
    "signature_invalid": 422,
    "untrusted_chain": 422,
    "certificate_expired": 422,
    "subject_mismatch": 422,
    "nonce_mismatch": 422,
    "nonce_unknown": 422,
    "document_expired": 422,
    "document_not_yet_valid": 422,
    "verification_failed": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "store_unavailable": 503,
})

#: Codes for werkzeug's routing answers, which have no domain exception.
_HTTP_CODES: Final = MappingProxyType({404: "not_found", 405: "method_not_allowed"})

#: The challenge a 401 carries (RFC 6750 section 3).
WWW_AUTHENTICATE: Final = 'Bearer realm="attest-service"'


def error_body(code: str, message: str) -> dict[str, object]:
    """The contract's error body."""
    return {"verified": False, "error": {"code": code, "message": message}}


def error_response(error: AttestError) -> Response:
    """The HTTP answer for a domain error: its status, the JSON body and the headers the status calls for."""
    status = STATUS_BY_CODE.get(error.code, 500)
    if status == 500:
        # A configuration error or an unmapped code at request time is a bug; say nothing more to the caller.
        _LOG.error("unmapped error reached the API: %s: %s", error.code, error.message)
        response = jsonify(error_body("internal_error", "internal error"))
    elif isinstance(error, StoreUnavailable):
        # The detail names the store's address (and whatever the operator put in its URL): it is for the
        # operator's log, not for callers.
        _LOG.warning("nonce store unavailable: %s", error.message)
        response = jsonify(error_body(error.code, "the nonce store is unavailable; nothing was accepted"))
    else:
        response = jsonify(error_body(error.code, error.message))
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    if isinstance(error, RateLimited):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _http_exception(exc: HTTPException) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(RequestTooLarge("request body larger than the limit"))
    status = exc.code or 500
    if status == 400:
        return error_response(MalformedRequest(exc.description or "bad request"))
    code = _HTTP_CODES.get(status)
    if code is None:
        _LOG.error("unexpected HTTP exception %s", exc)
        response = jsonify(error_body("internal_error", "internal error"))
        response.status_code = 500
        return response
    response = jsonify(error_body(code, exc.description or code.replace("_", " ")))
    response.status_code = status
    if status == 405:
        # Werkzeug computed the allowed methods for this route; RFC 9110 requires them on a 405.
        response.headers.update({key: value for key, value in exc.get_headers() if key == "Allow"})
    return response


def _unexpected(exc: Exception) -> Response:
    # The last resort: a bug. Log the traceback for the operator, tell the caller nothing about internals.
    _LOG.exception("unexpected error while answering a request", exc_info=exc)
    response = jsonify(error_body("internal_error", "internal error"))
    response.status_code = 500
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the handlers that turn every exception a view can raise into a JSON answer."""
    app.register_error_handler(AttestError, error_response)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
