"""``ATTEST_LOG_FORMAT``: every line a real ``serve`` writes, gunicorn's and ours, in the one format chosen.

The service runs as an operator runs it (gunicorn master, two gevent workers), at debug so that a refusal
writes a line of the application while a request is answered; its standard output and error are read back
after it stopped, every line of them.
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Final

import pytest

from tests.support.service import DocumentFactory, ServiceProcess, running_service

pytestmark = pytest.mark.slow

REQUEST_ID: Final = "first-hour-0001"
TEXT_LINE: Final = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+( \[[\w.:-]+\])? .*")


def _exercise(service: ServiceProcess) -> None:
    """A challenge, a refused document (which logs its detail at debug) with our request id, a 404."""
    assert service.post("/v1/challenges").status == 201
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request("POST", "/v1/verify", body=json.dumps({"signature": "AAAAA"}).encode(),
                           headers={"Content-Type": "application/json", "X-Request-Id": REQUEST_ID})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 422
    assert service.get("/no-such-route").status == 404


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """The lines of a service run in the format ``request.param``, exercised and stopped."""
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.db'}",
           "ATTEST_LOG_LEVEL": "debug", "ATTEST_LOG_FORMAT": request.param}
    with running_service(env, tmp_path) as service:
        _exercise(service)
    return [line for line in service.log.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("served", ["json"], indirect=True)
def test_every_line_is_one_json_object_with_time_level_logger(served: list[str]) -> None:
    records = []
    for line in served:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert {"time", "level", "logger"} <= set(record), line
        records.append(record)
    loggers = {record["logger"] for record in records}
    # gunicorn's own error log, the application's lines and the access lines, all in the one shape.
    assert {"gunicorn.error", "gunicorn.access"} <= loggers, loggers
    assert any(name.startswith("attest_service") for name in loggers), loggers
    access = [record for record in records if record["logger"] == "gunicorn.access"]
    assert any(record["request_id"] == REQUEST_ID and record["status"] == 422 for record in access)
    # The line the application wrote while answering that request carries its id.
    detail = [record for record in records if record.get("request_id") == REQUEST_ID
              and record["logger"].startswith("attest_service")]
    assert any("malformed_document" in record["message"] for record in detail), records


@pytest.mark.parametrize("served", ["text"], indirect=True)
def test_every_line_is_text_with_time_level_logger(served: list[str]) -> None:
    for line in served:
        assert TEXT_LINE.fullmatch(line), line
    assert any(f" gunicorn.access [{REQUEST_ID}] POST /v1/verify 422 " in line for line in served), served
    assert any(" gunicorn.error " in line for line in served)
    assert any(re.search(rf" attest_service[\w.]* \[{REQUEST_ID}\] malformed_document", line) for line in served)
