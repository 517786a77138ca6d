"""The one gate every request body passes, on the direct path and in Flask alike: size, framing, time, memory.

A body is read from the WSGI server's stream in pieces, within four limits:

- size: at most :data:`MAX_BODY_BYTES` (the contract's 1 MiB), announced or chunked, else 413;
- framing: an announced length that is not a number, a body cut short, a malformed chunk or a connection
  that fails part way is 400 ``malformed_request``, never an error of ours (and when the peer is gone, the
  answer goes nowhere and the server closes the connection quietly);
- time: the whole body within ``ATTEST_BODY_TIMEOUT_SECONDS``, else 408 and the connection is closed. Under
  gevent (the shipped workers) a read waits in the event loop, and a ``gevent.Timeout`` around the whole
  read ends it at the deadline however the client trickles; outside gevent (Flask's test client) the body
  is already in memory and nothing waits;
- memory: the bytes the bodies being read may hold in one worker (:data:`MAX_BUFFERED_BYTES`, else 503
  ``service_busy``), and how many bodies one source may have in flight in one worker
  (:data:`MAX_BODIES_PER_SOURCE`, else 429): a flood of stalled near-limit bodies holds a bounded amount
  of memory, and one source cannot take all of it.

A body refused before it was read in full is read off the connection and dropped after the answer is sent
(:meth:`BodyGate.discard_rest`), in large pieces and within the same timeout: the server would otherwise
read it a kilobyte at a time before the connection's next request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from attest_service.errors import AttestError, RateLimited
from attest_service.web.errors import MalformedRequest, RequestTimeout, RequestTooLarge, ServiceBusy

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The largest request body accepted, in bytes (the contract: 1 MiB); refused with 413 request_too_large.
MAX_BODY_BYTES: Final = 1024 * 1024
#: Bytes asked of the server's stream at once: large enough that a body of the limit takes a few reads.
PIECE_BYTES: Final = 64 * 1024
#: Bytes that the bodies being read may hold at once in one worker. With the chart's two workers and the
#: default 1000 connections each, stalled near-limit bodies could otherwise hold about 2 GiB; this keeps
#: them far inside the chart's 512Mi limit, and is still 64 bodies of the limit (a verification is a few KiB).
MAX_BUFFERED_BYTES: Final = 64 * 1024 * 1024
#: Bodies one source may have in flight at once in one worker (a body of a few KiB is read in one go; only a
#: client that stalls keeps one open).
MAX_BODIES_PER_SOURCE: Final = 16
#: The environ key set once a request's body has been read to its end (or found absent).
_DONE: Final = "attest_service.body_done"
#: The digits of the largest length accepted: a longer CONTENT_LENGTH is over the limit whatever it says.
_MAX_LENGTH_DIGITS: Final = len(str(MAX_BODY_BYTES))

_LOG: Final = logging.getLogger(__name__)


class _BodyTimedOut(Exception):
    """Thrown into the reading greenlet at the deadline.

    An Exception (gevent's own Timeout is a BaseException), so that the server's body reader notes that
    its read failed and closes the connection after the answer, instead of waiting for the rest.
    """


def announced_length(environ: WSGIEnvironment) -> int | None:
    """The body's announced length (None when the body is chunked or absent); raise 400 or 413 when unusable.

    A request with a transfer coding is framed by it, whatever length it also announces (RFC 9112 section
    6.3; gunicorn refuses such requests before they get here).
    """
    if "HTTP_TRANSFER_ENCODING" in environ:
        return None
    text = environ.get("CONTENT_LENGTH")
    if text is None or text == "":
        return None
    if not (isinstance(text, str) and text.isascii() and text.isdigit()):
        raise MalformedRequest("the announced body length is not a number")
    if len(text) > _MAX_LENGTH_DIGITS or int(text) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body of {text[:24]} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    return int(text)


def _gevent_deadline() -> type[contextlib.AbstractContextManager[object]] | None:
    """Gevent's Timeout when this process's sockets are gevent's (the shipped workers), else None."""
    try:
        import gevent  # type: ignore[import-untyped]  # noqa: PLC0415 - only where gevent runs the sockets
        from gevent import monkey  # noqa: PLC0415
    except ImportError:  # pragma: no cover - gevent is a dependency of the service
        return None
    if not monkey.is_module_patched("socket"):
        return None
    timeout: type[contextlib.AbstractContextManager[object]] = gevent.Timeout
    return timeout


class BodyGate:
    """Reads request bodies within the limits of the module docstring; one per process, shared by both paths.

    Under gevent every request of a worker runs on the worker's one thread; the lock keeps the counts right
    under threaded servers too.
    """

    def __init__(self, timeout_seconds: float, *, max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 max_bodies_per_source: int = MAX_BODIES_PER_SOURCE) -> None:
        self.timeout_seconds = timeout_seconds
        self._max_buffered = max_buffered_bytes
        self._max_per_source = max_bodies_per_source
        self._buffered = 0
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        # Decided when the application is built: gunicorn's gevent worker patches sockets before it loads it.
        self._timeout = _gevent_deadline()
        self._retry_after = max(1, math.ceil(timeout_seconds))

    @property
    def buffered_bytes(self) -> int:
        """Bytes the bodies being read hold now (reserved before each read)."""
        return self._buffered

    def read(self, environ: WSGIEnvironment, source: str) -> bytes:
        """The whole body of the request in ``environ``, sent from ``source``; raises AttestError otherwise.

        Raises MalformedRequest (400), RequestTimeout (408), RequestTooLarge (413), RateLimited (429: this
        source has too many bodies in flight) or ServiceBusy (503: the worker holds its limit of body bytes).
        """
        length = announced_length(environ)
        if length is None and "HTTP_TRANSFER_ENCODING" not in environ:
            environ[_DONE] = True
            return b""
        if length == 0:
            environ[_DONE] = True
            return b""
        with self._admitted(source), self._reserved(length or 0) as reservation:
            try:
                with self._deadline():
                    data = self._read_exact(environ, length) if length is not None else \
                        self._read_to_end(environ, reservation)
            except AttestError:
                raise
            except _BodyTimedOut:
                # The server's reader has failed: it closes the connection once the answer is sent.
                environ[_DONE] = True
                raise RequestTimeout(f"the request body did not arrive within {self.timeout_seconds:g} s") from None
            except OSError as exc:
                # A connection that ends or fails part way (gunicorn's NoMoreData is an OSError too).
                environ[_DONE] = True
                _LOG.debug("request body cut short: %r", exc)
                raise MalformedRequest("the request body ended before it was complete") from None
            except Exception as exc:  # noqa: BLE001 - the server's framing errors (a malformed chunk) have no common type
                environ[_DONE] = True
                _LOG.debug("request body not well framed: %r", exc)
                raise MalformedRequest("the request body is not well framed (chunked encoding)") from None
        environ[_DONE] = True
        return data

    def discard_rest(self, environ: WSGIEnvironment) -> None:
        """Read what is left of the body off the connection and drop it, within the body timeout.

        Called once the answer is sent. When the body does not end in time or cannot be read, the server's
        reader has failed and the server closes the connection instead of reading on.
        """
        stream = environ.get("wsgi.input")
        if stream is None or not self.unread_body_may_remain(environ):
            return
        with contextlib.suppress(Exception), self._deadline():
            while stream.read(PIECE_BYTES):
                pass
        environ[_DONE] = True

    @staticmethod
    def unread_body_may_remain(environ: WSGIEnvironment) -> bool:
        """Whether part of the request's body may still be on the connection, unread."""
        if environ.get(_DONE):
            return False
        if "HTTP_TRANSFER_ENCODING" in environ:
            return True
        text = environ.get("CONTENT_LENGTH")
        return isinstance(text, str) and text not in ("", "0")

    @contextlib.contextmanager
    def _deadline(self) -> Iterator[None]:
        if self._timeout is None:
            yield
            return
        with self._timeout(self.timeout_seconds, _BodyTimedOut):  # type: ignore[call-arg]
            yield

    @contextlib.contextmanager
    def _admitted(self, source: str) -> Iterator[None]:
        with self._lock:
            count = self._in_flight.get(source, 0)
            if count >= self._max_per_source:
                raise RateLimited("too many request bodies in flight from this source",
                                  retry_after=self._retry_after)
            self._in_flight[source] = count + 1
        try:
            yield
        finally:
            with self._lock:
                count = self._in_flight[source] - 1
                if count:
                    self._in_flight[source] = count
                else:
                    del self._in_flight[source]

    @contextlib.contextmanager
    def _reserved(self, size: int) -> Iterator[_Reservation]:
        reservation = _Reservation(self)
        reservation.grow(size)
        try:
            yield reservation
        finally:
            with self._lock:
                self._buffered -= reservation.size

    def _grow(self, reservation: _Reservation, size: int) -> None:
        with self._lock:
            if self._buffered + size > self._max_buffered:
                raise ServiceBusy("the service is reading too many request bodies at once",
                                  retry_after=self._retry_after)
            self._buffered += size
            reservation.size += size

    def _read_exact(self, environ: WSGIEnvironment, length: int) -> bytes:
        stream = environ["wsgi.input"]
        if length <= PIECE_BYTES:
            data: bytes = stream.read(length)
        else:
            pieces = bytearray()
            while len(pieces) < length:
                piece = stream.read(min(PIECE_BYTES, length - len(pieces)))
                if not piece:
                    break
                pieces += piece
            data = bytes(pieces)
        if len(data) != length:
            # The client closed the connection part way through the body it announced: nothing more to read.
            environ[_DONE] = True
            raise MalformedRequest(f"the request body ended after {len(data)} of its {length} bytes")
        return data

    def _read_to_end(self, environ: WSGIEnvironment, reservation: _Reservation) -> bytes:
        # A chunked body has no announced length: read one byte past the limit, so that an oversized body is
        # refused as too large rather than parsed, truncated, as broken JSON.
        stream = environ["wsgi.input"]
        pieces = bytearray()
        while len(pieces) <= MAX_BODY_BYTES:
            want = min(PIECE_BYTES, MAX_BODY_BYTES + 1 - len(pieces))
            reservation.grow(want)
            piece = stream.read(want)
            if not piece:
                return bytes(pieces)
            pieces += piece
        raise RequestTooLarge(f"request body over the limit of {MAX_BODY_BYTES} bytes")


class _Reservation:
    """The bytes one body read has reserved of its worker's budget."""

    __slots__ = ("_gate", "size")

    def __init__(self, gate: BodyGate) -> None:
        self._gate = gate
        self.size = 0

    def grow(self, size: int) -> None:
        """Reserve ``size`` more bytes; raises ServiceBusy when the worker holds its limit."""
        if size:
            self._gate._grow(self, size)
