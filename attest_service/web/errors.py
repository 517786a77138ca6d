"""The one mapping from errors to HTTP: the errors only HTTP has, headers and ``{"verified": false, ...}`` bodies.

Domain code raises :class:`~attest_service.errors.AttestError` subclasses, each carrying its ``http_status``,
and never sees HTTP. The errors of the request itself (not JSON, no key, too large) are defined here, beside
werkzeug's own exceptions (unknown route, wrong method, oversized body), which are translated too, so every
answer that is not a success has the same JSON shape.
"""

from __future__ import annotations

import json
import logging
from types import MappingProxyType
from typing import Final

from flask import Flask, Response
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from attest_service.errors import AttestError, ConfigurationError, RateLimited, StoreUnavailable
from attest_service.logsafe import loggable

_LOG: Final = logging.getLogger(__name__)


class MalformedRequest(AttestError):
    """The request body is not JSON, or a field is missing or of the wrong type."""

    code = "malformed_request"
    http_status = 400


class RequestTimeout(AttestError):
    """The request body did not arrive in full within ``ATTEST_BODY_TIMEOUT_SECONDS``."""

    code = "request_timeout"
    http_status = 408


class RequestTooLarge(AttestError):
    """The request body exceeds the size limit."""

    code = "request_too_large"
    http_status = 413


class ServiceBusy(AttestError):
    """The worker holds as many request bodies as it may buffer; ``retry_after`` is in whole seconds."""

    code = "service_busy"
    http_status = 503

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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
    # The VM-side client's errors (attest_service.imds) are never answered by the service; without this
    # filter they would join the table whenever the client happens to be imported first (as in the tests).
    table = {cls.code: cls.http_status for cls in classes
             if not issubclass(cls, ConfigurationError) and not cls.__module__.startswith("attest_service.imds")}
    table.update({code: status for status, code in _HTTP_CODES.items()})
    return dict(sorted(table.items(), key=lambda item: (item[1], item[0])))


#: The table :func:`status_by_code` builds, once: the OpenAPI document lists it.
STATUS_BY_CODE: Final = MappingProxyType(status_by_code())

#: The challenge a 401 carries (RFC 6750 section 3).
WWW_AUTHENTICATE: Final = 'Bearer realm="attest-service"'


#: Compact, ASCII only, keys in the order given: the JSON that Flask's jsonify writes outside debug mode.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def json_bytes(value: object) -> bytes:
    """``value`` (JSON types only) as the API writes every JSON body, as jsonify does: one line and a newline."""
    return (_ENCODER.encode(value) + "\n").encode("ascii")


def json_answer(body: bytes, status: int = 200) -> Response:
    """A response carrying ``body``, JSON from :func:`json_bytes`; needs no application context."""
    return Response(body, status=status, mimetype="application/json")


def json_response(value: object, status: int) -> Response:
    """:func:`json_answer` of ``value``."""
    return json_answer(json_bytes(value), status)


def error_body(code: str, message: str) -> dict[str, object]:
    """The contract's error body."""
    return {"verified": False, "error": {"code": code, "message": message}}


def error_response(error: AttestError) -> Response:
    """The HTTP answer for a domain error: its status, the JSON body and the headers the status calls for."""
    status = error.http_status
    if status == 500:
        # A configuration error (or the base class) at request time is a bug; say nothing more to the caller.
        _LOG.error("unmapped error reached the API: %s: %s", error.code, loggable(error.message, 500))
        response = json_response(error_body("internal_error", "internal error"), status)
    elif isinstance(error, StoreUnavailable):
        # The detail names the store's address (and whatever the operator put in its URL): it is for the
        # operator's log, not for callers.
        _LOG.warning("nonce store unavailable: %s", loggable(error.message, 500))
        response = json_response(error_body(error.code, "the nonce store is unavailable; nothing was accepted"),
                                 status)
    else:
        if error.__cause__ is not None and _LOG.isEnabledFor(logging.DEBUG):
            # The answer is our sentence; what the library (cryptography, asn1crypto, binascii) said is the
            # operator's, at debug. It can quote the document, so it is escaped.
            _LOG.debug("%s: %s; detail: %s: %s", error.code, error.message, type(error.__cause__).__name__,
                       loggable(error.__cause__, 500))
        response = json_response(error_body(error.code, error.message), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    if isinstance(error, RateLimited | ServiceBusy):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def http_error_response(exc: HTTPException) -> Response:
    """The JSON answer for one of werkzeug's HTTP exceptions (unknown route, wrong method, oversized body)."""
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(RequestTooLarge("request body larger than the limit"))
    status = exc.code or 500
    if status == 400:
        return error_response(MalformedRequest(exc.description or "bad request"))
    code = _HTTP_CODES.get(status)
    if code is None:
        _LOG.error("unexpected HTTP exception %s", loggable(exc, 500))
        return json_response(error_body("internal_error", "internal error"), 500)
    response = json_response(error_body(code, exc.description or code.replace("_", " ")), status)
    if status == 405:
        # Werkzeug computed the allowed methods for this route; RFC 9110 requires them on a 405.
        response.headers.update({key: value for key, value in exc.get_headers() if key == "Allow"})
    return response


def unexpected_error(exc: Exception) -> Response:
    """The last resort, for a bug: the traceback goes to the operator's log, the caller learns nothing of it."""
    _LOG.exception("unexpected error while answering a request", exc_info=exc)
    return json_response(error_body("internal_error", "internal error"), 500)


def answer_error(exc: Exception) -> Response:
    """The answer to any exception a request raised, on the direct path and in Flask alike.

    Our errors by their code, werkzeug's by theirs, anything else as a bug (500, traceback logged); a
    failure while building the answer is a bug too.
    """
    try:
        if isinstance(exc, AttestError):
            return error_response(exc)
        if isinstance(exc, HTTPException):
            return http_error_response(exc)
    except Exception as bug:  # noqa: BLE001 - a failing handler is a bug like any other
        return unexpected_error(bug)
    return unexpected_error(exc)


def register_error_handlers(app: Flask) -> None:
    """Install :func:`answer_error` for every exception a view can raise (werkzeug's HTTP errors included)."""
    app.register_error_handler(Exception, answer_error)
