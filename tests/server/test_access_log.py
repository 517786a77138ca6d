"""The JSON access log: one line per request, written alike by the direct path and through logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config  # type: ignore[import-untyped]

from attest_service.server.access_log import JsonAccessLogger

ENVIRON = {"REMOTE_ADDR": "192.0.2.7", "REQUEST_METHOD": "POST", "PATH_INFO": '/v1/"verify"\n',
           "QUERY_STRING": "a=%s%d", "HTTP_USER_AGENT": "agent ☃"}


@pytest.fixture(autouse=True)
def _close_access_handlers() -> Iterator[None]:
    # gunicorn's loggers are the process's "gunicorn.*" loggers: close what each test opened on them.
    yield
    for name in ("gunicorn.access", "gunicorn.error"):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
        log.filters.clear()
        log.propagate = False


def logger(path: Path) -> JsonAccessLogger:
    """A logger set up as gunicorn sets it up for ``accesslog = path`` (one logger per process at a time)."""
    for handler in list(logging.getLogger("gunicorn.access").handlers):
        handler.close()
    config = Config()
    config.set("accesslog", str(path))
    made = JsonAccessLogger(config)
    # pytest's log capture may have put its handlers on the logger too; a served process has gunicorn's only.
    for handler in list(made.access_log.handlers):
        if not getattr(handler, "_gunicorn", False):
            made.access_log.removeHandler(handler)
    return made


def answer(log: JsonAccessLogger, request_id: str) -> None:
    response = SimpleNamespace(headers=[("Content-Type", "application/json"), ("X-Request-Id", request_id)],
                               status_code=200, sent=123)
    log.access(response, None, ENVIRON, timedelta(milliseconds=1.5))


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_time(line: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in line.items() if key != "time"}


def test_gunicorns_setup_is_written_directly_and_reads_the_same(tmp_path: Path) -> None:
    direct = logger(tmp_path / "direct.log")
    assert direct._plain_handler() is not None
    answer(direct, "direct-id")
    filtered = logger(tmp_path / "filtered.log")
    # A filter (as a logconfig could add) sends the line through logging instead.
    filtered.access_log.handlers[0].addFilter(lambda record: True)
    assert filtered._plain_handler() is None
    answer(filtered, "direct-id")
    [first], [second] = lines(tmp_path / "direct.log"), lines(tmp_path / "filtered.log")
    assert without_time(first) == without_time(second)
    assert first["path"] == '/v1/"verify"\n'
    assert first["query"] == "a=%s%d"
    assert first["request_id"] == "direct-id"
    assert first["status"] == 200


@pytest.mark.parametrize("change", ["level", "formatter", "second handler", "logger filter", "propagate"])
def test_any_other_setup_goes_through_logging(tmp_path: Path, change: str) -> None:
    log = logger(tmp_path / "access.log")
    handler = log.access_log.handlers[0]
    if change == "level":
        handler.setLevel(logging.WARNING)
    elif change == "formatter":
        handler.setFormatter(logging.Formatter("access %(message)s"))
    elif change == "second handler":
        log.access_log.addHandler(logging.FileHandler(tmp_path / "copy.log"))
    elif change == "propagate":
        log.access_log.propagate = True
    else:
        log.access_log.addFilter(lambda record: True)
    assert log._plain_handler() is None
    answer(log, "other-id")
    text = (tmp_path / "access.log").read_text(encoding="utf-8")
    if change == "level":
        assert text == ""
    elif change == "formatter":
        assert text.startswith("access {")
    else:
        assert json.loads(text)["request_id"] == "other-id"


#: A request path as gunicorn hands it over, percent-decoded: a terminal's CSI in its 7-bit and 8-bit forms,
#: a line separator and a right-to-left override, which a path in a request can carry as %1b, %c2%9b, ...
HOSTILE_PATH = "/x\x1b[2J\x9b31m\u2028\u202eok\n"


@pytest.mark.parametrize("kind", ["json", "text"])
def test_a_hostile_path_reaches_the_line_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setenv("ATTEST_LOG_FORMAT", kind)
    log = logger(tmp_path / "access.log")
    response = SimpleNamespace(headers=[("X-Request-Id", "hostile-id")], status_code=404, sent=9)
    log.access(response, None, {**ENVIRON, "PATH_INFO": HOSTILE_PATH, "QUERY_STRING": "q=\x1b"},
               timedelta(milliseconds=1))
    text = (tmp_path / "access.log").read_text(encoding="utf-8")
    [line] = text.splitlines()  # str.splitlines() breaks at U+2028 too
    assert line.isascii()
    assert line.isprintable()
    if kind == "json":
        assert json.loads(line)["path"] == HOSTILE_PATH
    else:
        assert "/x\\x1b[2J\\x9b31m\\u2028\\u202eok\\n" in line
