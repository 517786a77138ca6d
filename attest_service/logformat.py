"""The service's one log format: every line JSON, or every line text, each with time, level, logger and request id.

``ATTEST_LOG_FORMAT`` chooses (``json``, the default and what the image and the chart run, or ``text``,
which ``make run`` uses at a terminal). The same formatter writes gunicorn's own error log, the
application's lines and the access lines (:mod:`attest_service.server.access_log`), so a log collector
parses one shape:

- json: ``{"time": "2026-06-25T18:57:45.123+00:00", "level": "warning", "logger": "attest_service...",
  "message": "...", "request_id": "...", "pid": 7}`` (``request_id`` when the line was written while a
  request was being answered; ``exception`` with the traceback when there is one);
- text: ``2026-06-25T18:57:45.123+00:00 WARNING attest_service... [request-id] message``.

The request id is the one the answer carries in ``X-Request-Id``: :data:`REQUEST_ID` holds it while a
request is answered (a context variable: each gevent greenlet, each thread, has its own).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final, TextIO

#: The variable that chooses the format.
LOG_FORMAT_VARIABLE: Final = "ATTEST_LOG_FORMAT"
#: The formats, the default first.
LOG_FORMATS: Final = ("json", "text")
#: The id of the request being answered in this context, for every line written meanwhile.
REQUEST_ID: Final[ContextVar[str | None]] = ContextVar("attest_request_id", default=None)

# ASCII only: JSON itself escapes only the C0 controls, so a C1 control (U+009B is a terminal's CSI), a line
# separator (U+2028) or a bidirectional override in a request path would otherwise reach the line as it came.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=True)


def log_format(env: Mapping[str, str] | None = None) -> str:
    """``ATTEST_LOG_FORMAT`` (default ``json``); raises ValueError naming the variable for anything else."""
    env = os.environ if env is None else env
    value = (env.get(LOG_FORMAT_VARIABLE) or LOG_FORMATS[0]).strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_VARIABLE}: expected json or text, got {value[:20]!r}")
    return value


def timestamp(created: float | None = None) -> str:
    """An instant as every line writes it: ISO 8601 in UTC, to the millisecond."""
    instant = datetime.now(UTC) if created is None else datetime.fromtimestamp(created, UTC)
    return instant.isoformat(timespec="milliseconds")


def json_line(fields: Mapping[str, object]) -> str:
    """One JSON object on one line (JSON escapes every line break a message holds)."""
    return _ENCODER.encode(fields)


def text_line(*, time: str, level: str, logger: str, message: str, request_id: str | None) -> str:
    """One text line: time, level, logger, the request id in brackets when there is one, the message."""
    identifier = f" [{request_id}]" if request_id else ""
    # A message holding a line break would start a line of its own; the text format keeps one line a record.
    flat = message.replace("\r", "\\r").replace("\n", "\\n")
    return f"{time} {level.upper()} {logger}{identifier} {flat}"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, pid, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's line."""
        fields: dict[str, object] = {"time": timestamp(record.created), "level": record.levelname.lower(),
                                     "logger": record.name, "message": record.getMessage()}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            fields["request_id"] = request_id
        fields["pid"] = record.process
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        return json_line(fields)


class TextFormatter(logging.Formatter):
    """Formats a record as one text line: time, level, logger, ``[request id]``, message (and a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, followed by its traceback's lines when there is one."""
        line = text_line(time=timestamp(record.created), level=record.levelname, logger=record.name,
                         message=record.getMessage(), request_id=REQUEST_ID.get())
        if record.exc_info:
            return f"{line}\n{self.formatException(record.exc_info)}"
        return line


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``kind`` (``json`` or ``text``)."""
    return JsonFormatter() if kind == "json" else TextFormatter()


def install(kind: str, level: str, stream: TextIO | None = None) -> None:
    """Send every Python log record of the process to ``stream`` (standard error) in ``kind``.

    The root logger gets one handler (other libraries' warnings come out in the same shape); the
    service's own logger ``attest_service`` logs at ``level`` and propagates to it. Idempotent.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_attest_service", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(kind))
    handler._attest_service = True  # type: ignore[attr-defined]  # marks the handler this function owns
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("attest_service").setLevel(level.upper())


__all__ = [
    "LOG_FORMATS",
    "LOG_FORMAT_VARIABLE",
    "REQUEST_ID",
    "JsonFormatter",
    "TextFormatter",
    "formatter",
    "install",
    "json_line",
    "log_format",
    "text_line",
    "timestamp",
]
