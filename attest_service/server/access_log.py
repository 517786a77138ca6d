"""Gunicorn's logs in the service's one format (:mod:`attest_service.logformat`).

Access lines (one per request, carrying the request id), gunicorn's own error log and the application's
lines all come out in ``ATTEST_LOG_FORMAT``.

Gunicorn's own format string does not escape its atoms, so a request path with a quote would break a
JSON line; here each line is built with :func:`json.dumps` from the atoms gunicorn computes.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from datetime import timedelta
from typing import Any, Final

from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from attest_service.logformat import formatter, install, json_line, log_format, text_line, timestamp
from attest_service.logsafe import loggable


class JsonAccessLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type information
    """Gunicorn logger writing every line in ``ATTEST_LOG_FORMAT`` (JSON by default), access lines included."""

    def setup(self, cfg: Any) -> None:  # noqa: ANN401 - gunicorn's Config
        """Gunicorn's setup, then the one format on its error log and on every Python logger of the process.

        The master runs this before it forks, so the workers inherit the handlers.
        """
        super().setup(cfg)
        # Checked by serve's start-up before gunicorn runs; the fallback only serves a bare gunicorn.
        try:
            self.log_format = log_format()
        except ValueError:
            self.log_format = "json"
        for handler in self.error_log.handlers:
            handler.setFormatter(formatter(self.log_format))
        install(self.log_format, (os.environ.get("ATTEST_LOG_LEVEL") or "info"))

    def access(self, resp: Any, req: Any, environ: dict[str, Any],  # noqa: ANN401 - gunicorn's signature
               request_time: timedelta) -> None:
        """Write one JSON line for a finished request (when access logging is enabled)."""
        if not self.access_log_enabled:
            return
        # The fields are read from the environ as gunicorn's atoms() reads them; atoms() itself formats every
        # header and environ variable for each request, which cost an eighth of a verification's CPU.
        request_id = "-"
        for key, value in resp.headers:
            if key.lower() == "x-request-id":
                request_id = value
                break
        record = {
            "time": timestamp(),
            "level": "info",
            "logger": "gunicorn.access",
            "request_id": request_id,
            "remote": environ.get("REMOTE_ADDR", "-"),
            "method": environ.get("REQUEST_METHOD"),
            # gunicorn's own answers come with an environ holding no PATH_INFO; the request has the path.
            "path": environ.get("PATH_INFO", getattr(req, "path", None)),
            "query": environ.get("QUERY_STRING"),
            "status": _status(resp),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "user_agent": environ.get("HTTP_USER_AGENT", "-"),
            "pid": os.getpid(),
        }
        try:
            line = json_line(record) if getattr(self, "log_format", "json") == "json" else _text(record)
            handler = self._plain_handler()
            if handler is None:
                self.access_log.info(line)
                return
            # What Handler.handle() and StreamHandler.emit() do with a record, for this one line.
            handler.acquire()
            try:
                handler.stream.write(line + handler.terminator)
                handler.flush()
            finally:
                handler.release()
        except Exception:  # noqa: BLE001 - a failing log line must never fail the request; gunicorn does the same
            self.error(traceback.format_exc())

    def _plain_handler(self) -> logging.StreamHandler[Any] | None:
        """The access log's one handler when writing to it directly writes exactly what logging would.

        That is gunicorn's own setup (``accesslog``: one stream or file handler with its ``%(message)s``
        formatter, no filters, not propagated, INFO enabled). Logging's path for one line (the caller lookup,
        a LogRecord, the formatter) cost a twentieth of a request; any other setup (a logconfig, syslog,
        filters) takes it.
        """
        log: logging.Logger = self.access_log
        if len(log.handlers) != 1 or log.filters or log.propagate or not log.isEnabledFor(logging.INFO):
            return None
        handler = log.handlers[0]
        if not isinstance(handler, logging.StreamHandler) or type(handler) not in _PLAIN_HANDLERS:
            return None
        formatter = handler.formatter
        if (handler.filters or handler.level > logging.INFO or handler.stream is None
                or formatter is None or getattr(formatter, "_fmt", None) != _MESSAGE_ONLY):
            return None
        return handler


def _status(resp: Any) -> int | None:  # noqa: ANN401 - gunicorn's Response
    # gunicorn's own answer to a request it refuses (a Content-Length that is not a number, or both
    # Content-Length and Transfer-Encoding) reaches access() with its ``status`` text only: failing on it
    # would turn gunicorn's 400 into a 500 and a traceback.
    code = getattr(resp, "status_code", None)
    if isinstance(code, int):
        return code
    first = str(getattr(resp, "status", "") or "").split(" ", 1)[0]
    return int(first) if first.isdigit() else None


def _text(record: dict[str, Any]) -> str:
    """An access line in the text format: what JSON would say, in the order a person reads it."""
    # The path arrives percent-decoded: "%1b[2J" in a request would be a terminal control sequence here.
    path = loggable(record["path"], _REQUEST_LINE_CHARS)
    query = f"?{loggable(record['query'], _REQUEST_LINE_CHARS)}" if record["query"] else ""
    message = (f"{record['method']} {path}{query} {record['status']} {record['bytes']}B "
               f"{record['duration_ms']}ms remote={record['remote']} agent={json.dumps(record['user_agent'])}")
    return text_line(time=str(record["time"]), level="info", logger="gunicorn.access", message=message,
                     request_id=None if record["request_id"] == "-" else str(record["request_id"]))


#: Characters of a path or query kept in a text access line: gunicorn's limit of a whole request line.
_REQUEST_LINE_CHARS: Final = 4096
#: Handler classes whose emit() is exactly "format, write, terminator, flush".
_PLAIN_HANDLERS: Final = (logging.StreamHandler, logging.FileHandler)
#: The access formatter gunicorn installs.
_MESSAGE_ONLY: Final = "%(message)s"
