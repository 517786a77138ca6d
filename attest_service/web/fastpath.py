"""``POST /v1/verify`` answered straight from WSGI, in front of the Flask application.

Why: verification is the route under load, and Flask's request machinery around it (the request and
application contexts, URL matching, the before and after hooks, the response object) was a third of the
application's instructions per verification, more than the signature check. The direct path runs the very same
function as the Flask view (:func:`~attest_service.web.routes.verification_body`), and does what the
application's hooks do (the request id, the request metrics) with the same helpers; errors are answered by
the same :func:`~attest_service.web.errors.error_response`.

It takes only the plain shape of the request: ``POST`` to exactly ``/v1/verify`` with an announced
``Content-Length`` within the limit and no ``Transfer-Encoding``. Everything else (other routes and methods,
chunked bodies, lengths over the limit or not a plain number) goes to Flask untouched, which answers it as it
always did. (A request with both a length and a transfer coding is framed by the coding, RFC 9112 section
6.3; gunicorn refuses such requests, and any that reach the application go to Flask, which reads them so.)
Flask's signals are not sent for the requests answered here; the service connects nothing to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, TypeVar

from werkzeug import Response
from werkzeug.exceptions import HTTPException

from attest_service.errors import AttestError
from attest_service.web import metrics
from attest_service.web.errors import MalformedRequest, error_response, http_error_response, unexpected_error
from attest_service.web.routes import VERIFY_PATH, verification_body
from attest_service.web.service import MAX_BODY_BYTES, REQUEST_ID_HEADER, Service, request_id

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: The digits of the largest length taken here: a longer CONTENT_LENGTH is over the limit whatever it says.
_MAX_LENGTH_DIGITS: Final = len(str(MAX_BODY_BYTES))


def announced_length(environ: WSGIEnvironment) -> int | None:
    """The body's announced length when it is a plain decimal number within the limit, else None."""
    text = environ.get("CONTENT_LENGTH")
    if not isinstance(text, str) or not 0 < len(text) <= _MAX_LENGTH_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    length = int(text)
    return length if length <= MAX_BODY_BYTES else None


class VerifyFastPath:
    """WSGI middleware: answers plain ``POST /v1/verify`` requests itself, passes the rest to ``flask_app``."""

    def __init__(self, service: Service, flask_app: WSGIApplication) -> None:
        self._service = service
        #: The application every other request goes to (Flask's ``wsgi_app``).
        self.flask_app = flask_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer ``environ`` (the WSGI interface)."""
        if environ.get("PATH_INFO") != VERIFY_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.flask_app(environ, start_response)
        length = announced_length(environ)
        if length is None or "HTTP_TRANSFER_ENCODING" in environ:
            return self.flask_app(environ, start_response)
        identifier = request_id(environ.get("HTTP_X_REQUEST_ID"))

        def read_body() -> bytes:
            data: bytes = environ["wsgi.input"].read(length)
            if len(data) != length:
                # The client closed the connection part way through the body it announced.
                raise MalformedRequest(f"the request body ended after {len(data)} of its {length} bytes")
            return data

        try:
            body = verification_body(self._service, environ, read_body)
        except Exception as exc:  # noqa: BLE001 - answered as Flask's error handlers answer it
            response = _refusal(exc)
        else:
            metrics.record_http_request(VERIFY_PATH, 200)
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                      (REQUEST_ID_HEADER, identifier)])
            return [body]
        return finish_response(response, identifier, VERIFY_PATH)(environ, start_response)


def _refusal(exc: Exception) -> Response:
    # The handlers the application registers (errors.register_error_handlers), and, as in Flask, the
    # last-resort one when a handler itself fails.
    try:
        if isinstance(exc, AttestError):
            return error_response(exc)
        if isinstance(exc, HTTPException):
            return http_error_response(exc)
    except Exception as bug:  # noqa: BLE001 - a failing handler is a bug like any other
        return unexpected_error(bug)
    return unexpected_error(exc)


_Answer = TypeVar("_Answer", bound=Response)


def finish_response(response: _Answer, identifier: str, route: str) -> _Answer:
    """What every answer gets, from Flask's after-request hook or here: its request id, and its count.

    An answer to a request whose body was not read (413) also asks for the connection to be closed: the
    unread body is still on it. (gunicorn drops that header and reads the body off the connection instead.)
    """
    response.headers[REQUEST_ID_HEADER] = identifier
    if response.status_code == 413:
        response.headers["Connection"] = "close"
    metrics.record_http_request(route, response.status_code)
    return response
