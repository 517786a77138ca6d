"""``POST /v1/verify`` answered straight from WSGI, in front of the Flask application.

Why: verification is the route under load, and Flask's request machinery around it (the request and
application contexts, URL matching, the before and after hooks, the response object) cost more of a
verification than the signature check (docs/DEPLOYMENT.md, "Sizing"). The direct path runs the very same
function as the Flask view (:func:`~attest_service.web.routes.verification_body`), which reads the body
through the same gate (:mod:`attest_service.web.body`); errors are answered by the same
:func:`~attest_service.web.errors.answer_error`, and every answer is finished by the same
:func:`~attest_service.web.edges.finishing_headers`.

It takes only the plain shape of the request: ``POST`` to exactly ``/v1/verify`` with an announced
``Content-Length`` within the limit and no ``Transfer-Encoding``. Everything else (other routes and methods,
chunked bodies, lengths over the limit or not a plain number) goes to Flask, which answers it through the same
functions. Flask's signals are not sent for the requests answered here; the service connects nothing to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from attest_service.errors import AttestError
from attest_service.logformat import REQUEST_ID
from attest_service.web.body import announced_length
from attest_service.web.edges import finish_response, finishing_headers
from attest_service.web.errors import answer_error
from attest_service.web.routes import VERIFY_PATH, verification_body
from attest_service.web.service import Service, request_id

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def _plain_length(environ: WSGIEnvironment) -> int | None:
    """The announced length of a plain request this path takes, else None (the request is Flask's)."""
    try:
        return announced_length(environ)
    except AttestError:
        return None


class VerifyFastPath:
    """WSGI middleware: answers plain ``POST /v1/verify`` requests itself, passes the rest to ``flask_app``."""

    def __init__(self, service: Service, flask_app: WSGIApplication) -> None:
        self._service = service
        #: The application every other request goes to (Flask's ``wsgi_app``).
        self.flask_app = flask_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer ``environ`` (the WSGI interface)."""
        if (environ.get("PATH_INFO") != VERIFY_PATH or environ.get("REQUEST_METHOD") != "POST"
                or _plain_length(environ) is None):
            return self.flask_app(environ, start_response)
        identifier = request_id(environ.get("HTTP_X_REQUEST_ID"))
        # Every line logged while this request is answered carries its id (attest_service.logformat).
        token = REQUEST_ID.set(identifier)
        try:
            body = verification_body(self._service, environ)
        except Exception as exc:  # noqa: BLE001 - answered as Flask's error handler answers it
            response = finish_response(answer_error(exc), identifier, VERIFY_PATH, environ, self._service.bodies)
            return response(environ, start_response)
        finally:
            REQUEST_ID.reset(token)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  *finishing_headers(200, identifier, VERIFY_PATH)])
        return [body]
