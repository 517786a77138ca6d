"""Gunicorn's access log as JSON lines, one object per request, carrying the request id.

Gunicorn's own format string does not escape its atoms, so a request path with a quote would break a
JSON line; here each line is built with :func:`json.dumps` from the atoms gunicorn computes.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import UTC, datetime, timedelta
from typing import Any

from gunicorn.glogging import Logger  # type: ignore[import-untyped]


class JsonAccessLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type information
    """Gunicorn logger whose access lines are JSON objects."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:  # noqa: ANN401
        """Write one JSON line for a finished request (when access logging is enabled)."""
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        headers = {key.lower(): value for key, value in resp.headers}
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": headers.get("x-request-id", "-"),
            "remote": atoms.get("h"),
            "method": atoms.get("m"),
            "path": atoms.get("U"),
            "query": atoms.get("q"),
            "status": resp.status_code,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "user_agent": atoms.get("a"),
            "pid": os.getpid(),
        }
        try:
            self.access_log.info(json.dumps(record, ensure_ascii=False))
        except Exception:  # noqa: BLE001 - a failing log line must never fail the request; gunicorn does the same
            self.error(traceback.format_exc())
