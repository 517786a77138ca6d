"""What every answer gets, on the direct path and in Flask alike: its request id, its count, its connection.

One function says what finishing an answer means (:func:`finishing_headers`); the direct path adds its
result to the answers it builds itself, and :func:`finish_response` to the response objects of Flask and of
the error mapping. A request whose body was not read in full has the rest read off the connection and
dropped once the answer is sent (:meth:`~attest_service.web.body.BodyGate.discard_rest`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from werkzeug import Response

from attest_service.web import metrics
from attest_service.web.body import BodyGate
from attest_service.web.service import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

_Answer = TypeVar("_Answer", bound=Response)


def finishing_headers(status: int, identifier: str, route: str) -> list[tuple[str, str]]:
    """The headers every answer of ``status`` carries, and its count in the request metrics.

    An answer to a request whose body was refused unread (413) also asks for the connection to be closed:
    the unread body is still on it. (gunicorn drops that header and reads the body off the connection
    instead, which the body gate does first, in large pieces and within the body timeout.)
    """
    metrics.record_http_request(route, status)
    if status == 413:
        return [(REQUEST_ID_HEADER, identifier), ("Connection", "close")]
    return [(REQUEST_ID_HEADER, identifier)]


def finish_response(response: _Answer, identifier: str, route: str, environ: WSGIEnvironment,
                    bodies: BodyGate) -> _Answer:
    """Finish a response object with :func:`finishing_headers`; drop an unread body once it is sent."""
    for name, value in finishing_headers(response.status_code, identifier, route):
        response.headers[name] = value
    if bodies.unread_body_may_remain(environ):
        response.call_on_close(lambda: bodies.discard_rest(environ))
    return response
