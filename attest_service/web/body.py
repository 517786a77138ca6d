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
- memory: the bytes the bodies being read hold in one worker (:data:`MAX_BUFFERED_BYTES`, else 503
  ``service_busy``) and the bytes those of one source hold in one worker (:data:`MAX_BYTES_PER_SOURCE`,
  else 429), counted as they arrive: a flood of stalled near-limit bodies holds a bounded amount of
  memory, one source cannot take all of it, and a client that holds its connection without sending costs
  no budget (the timeout ends it). Between two reads, the server holds at most one piece
  (:data:`PIECE_BYTES`) of a body that is not counted yet.

A body refused before it was read in full is read off the connection and dropped after the answer is sent
(:meth:`BodyGate.discard_rest`), in large pieces and within the same timeout: the server would otherwise
read it a kilobyte at a time before the connection's next request.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import TYPE_CHECKING, Final

from attest_service.errors import AttestError, RateLimited
from attest_service.web.errors import MalformedRequest, RequestTimeout, RequestTooLarge, ServiceBusy

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: The largest request body accepted, in bytes (the contract: 1 MiB); refused with 413 request_too_large.
MAX_BODY_BYTES: Final = 1024 * 1024
#: Bytes asked of the server's stream at once. Large enough that a body of the limit takes a few dozen reads
#: (the server copies what it holds beyond a read at each one), small enough that what a stalled connection
#: holds uncounted, at most one piece, stays small times the worker's 1000 connections.
PIECE_BYTES: Final = 32 * 1024
#: Bytes that the bodies being read may hold at once in one worker. With the chart's two workers and the
#: default 1000 connections each, stalled near-limit bodies could otherwise hold about 2 GiB; this keeps
#: them far inside the chart's 512Mi limit, and is still 64 bodies of the limit (a verification is a few KiB).
MAX_BUFFERED_BYTES: Final = 64 * 1024 * 1024
#: Bytes that the bodies one source is sending may hold at once in one worker: a quarter of the worker's,
#: so that one source (or one NAT) cannot take the whole budget.
MAX_BYTES_PER_SOURCE: Final = MAX_BUFFERED_BYTES // 4
#: The environ key set once a request's body has been read to its end (or found absent).
_DONE: Final = "attest_service.body_done"
#: The digits of the largest length accepted: a longer CONTENT_LENGTH is over the limit whatever it says.
_MAX_LENGTH_DIGITS: Final = len(str(MAX_BODY_BYTES))

_LOG: Final = logging.getLogger(__name__)
#: What stands for the deadline where nothing can wait (outside gevent): reusable, does nothing.
_NO_DEADLINE: Final = contextlib.nullcontext()


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

    The bytes a body holds are counted as they arrive, against the worker and against the body's source, so
    that a client holding a connection open without sending costs nothing here (the body timeout ends it).
    Under gevent every request of a worker runs on the worker's one thread; the lock keeps the counts right
    under threaded servers too.
    """

    def __init__(self, timeout_seconds: float, *, max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 max_bytes_per_source: int = MAX_BYTES_PER_SOURCE) -> None:
        self.timeout_seconds = timeout_seconds
        self._max_buffered = max_buffered_bytes
        self._max_per_source = max_bytes_per_source
        self._buffered = 0
        self._by_source: dict[str, int] = {}
        self._lock = threading.Lock()
        # Decided when the application is built: gunicorn's gevent worker patches sockets before it loads it.
        self._timeout = _gevent_deadline()
        self._retry_after = max(1, math.ceil(timeout_seconds))

    @property
    def buffered_bytes(self) -> int:
        """Bytes the bodies being read hold now."""
        return self._buffered

    def read(self, environ: WSGIEnvironment, source: str) -> bytes:
        """The whole body of the request in ``environ``, sent from ``source``; raises AttestError otherwise.

        Raises MalformedRequest (400), RequestTimeout (408), RequestTooLarge (413), RateLimited (429: the
        bodies this source is sending hold its limit of bytes) or ServiceBusy (503: the bodies being read
        hold the worker's limit of bytes).
        """
        length = announced_length(environ)
        if (length is None and "HTTP_TRANSFER_ENCODING" not in environ) or length == 0:
            environ[_DONE] = True
            return b""
        counted = _Counted(self, source)
        try:
            with self._deadline():
                data = self._read_body(environ, length, counted)
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
        finally:
            counted.release()
        environ[_DONE] = True
        return data

    def _read_body(self, environ: WSGIEnvironment, length: int | None, counted: _Counted) -> bytes:
        stream = environ["wsgi.input"]
        if length is not None and length <= PIECE_BYTES:
            # The common case, a body of a few KiB: one read, nothing to hold between reads.
            data: bytes = stream.read(length)
        else:
            # A chunked body has no announced length: read one byte past the limit, so that an oversized body
            # is refused as too large rather than parsed, truncated, as broken JSON.
            wanted = length if length is not None else MAX_BODY_BYTES + 1
            pieces = bytearray()
            while len(pieces) < wanted:
                piece = stream.read(min(PIECE_BYTES, wanted - len(pieces)))
                if not piece:
                    break
                counted.add(len(piece))
                pieces += piece
            data = bytes(pieces)
            if length is None and len(data) > MAX_BODY_BYTES:
                raise RequestTooLarge(f"request body over the limit of {MAX_BODY_BYTES} bytes")
        if length is not None and len(data) != length:
            # The client closed the connection part way through the body it announced: nothing more to read.
            environ[_DONE] = True
            raise MalformedRequest(f"the request body ended after {len(data)} of its {length} bytes")
        return data

    def _count(self, source: str, size: int) -> None:
        """Count ``size`` more bytes held for ``source``; raise when the worker's or the source's limit is passed."""
        with self._lock:
            held = self._by_source.get(source, 0)
            if self._buffered + size > self._max_buffered:
                raise ServiceBusy("the service is reading too many request bodies at once",
                                  retry_after=self._retry_after)
            if held + size > self._max_per_source:
                raise RateLimited("the request bodies in flight from this source are too large together",
                                  retry_after=self._retry_after)
            self._buffered += size
            self._by_source[source] = held + size

    def _uncount(self, source: str, size: int) -> None:
        with self._lock:
            self._buffered -= size
            held = self._by_source[source] - size
            if held:
                self._by_source[source] = held
            else:
                del self._by_source[source]

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

    def _deadline(self) -> contextlib.AbstractContextManager[object]:
        # Not a generator-based context manager: this runs for every body, on the direct path too.
        if self._timeout is None:
            return _NO_DEADLINE
        return self._timeout(self.timeout_seconds, _BodyTimedOut)  # type: ignore[call-arg]

class _Counted:
    """The bytes one body holds, counted against its worker and its source until released."""

    __slots__ = ("_gate", "_size", "_source")

    def __init__(self, gate: BodyGate, source: str) -> None:
        self._gate = gate
        self._source = source
        self._size = 0

    def add(self, size: int) -> None:
        """Count ``size`` more bytes; raises ServiceBusy or RateLimited past a limit."""
        self._gate._count(self._source, size)
        self._size += size

    def release(self) -> None:
        """The body is no longer held."""
        if self._size:
            self._gate._uncount(self._source, self._size)
            self._size = 0
