"""The one mapping from errors to HTTP: the errors only HTTP has, headers and ``{"verified": false, ...}`` bodies.

Domain code raises :class:`~attest_service.errors.AttestError` subclasses, each carrying its ``http_status``,
and never sees HTTP. The errors of the request itself (not JSON, no key, too large) are defined here, beside
werkzeug's own exceptions (unknown route, wrong method, oversized body), which are translated too, so every
answer that is not a success has the same JSON shape.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Final

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from attest_service.errors import AttestError, ConfigurationError, RateLimited, StoreUnavailable

_LOG: Final = logging.getLogger(__name__)


class MalformedRequest(AttestError):
    """The request body is not JSON, or a field is missing or of the wrong type."""

    code = "malformed_request"
    http_status = 400


class Unauthorized(AttestError):
    """An API key is required and was missing or wrong."""

    code = "unauthorized"
    http_status = 401


class RequestTooLarge(AttestError):
    """The request body exceeds the size limit."""

    code = "request_too_large"
    http_status = 413


#: Codes for werkzeug's routing answers, which have no exception of ours.
_HTTP_CODES: Final = MappingProxyType({404: "not_found", 405: "method_not_allowed"})


def _error_classes(root: type[AttestError] = AttestError) -> list[type[AttestError]]:
    classes: list[type[AttestError]] = []
    subclasses: list[type[AttestError]] = root.__subclasses__()
    for subclass in subclasses:
        classes.append(subclass)
        classes.extend(_error_classes(subclass))
    return classes


def status_by_code() -> dict[str, int]:
    """HTTP status of every error code the API can answer: each class's own, and werkzeug's routing codes.

    Built from the classes (imported here, so the HTTP-only ones are included), so a new code cannot be
    missing from the table. ``configuration_error`` is left out: at request time it is a bug, answered as 500.
    """
    classes: list[type[AttestError]] = [AttestError, *_error_classes()]
    table = {cls.code: cls.http_status for cls in classes if not issubclass(cls, ConfigurationError)}
    table.update({code: status for status, code in _HTTP_CODES.items()})
    return dict(sorted(table.items(), key=lambda item: (item[1], item[0])))


#: The table :func:`status_by_code` builds, once: the OpenAPI document lists it.
STATUS_BY_CODE: Final = MappingProxyType(status_by_code())

#: The challenge a 401 carries (RFC 6750 section 3).
WWW_AUTHENTICATE: Final = 'Bearer realm="attest-service"'


def error_body(code: str, message: str) -> dict[str, object]:
    """The contract's error body."""
    return {"verified": False, "error": {"code": code, "message": message}}


def error_response(error: AttestError) -> Response:
    """The HTTP answer for a domain error: its status, the JSON body and the headers the status calls for."""
    status = error.http_status
    if status == 500:
        # A configuration error (or the base class) at request time is a bug; say nothing more to the caller.
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
