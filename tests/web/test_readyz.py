"""``/readyz`` is unauthenticated: a store failure is answered with its stable code, its detail goes to the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer
from tests.web.conftest import AppFactory


def test_unusable_sqlite_store_is_not_described_to_callers(make_client: AppFactory, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # A directory that cannot be made (a file is in the way): the driver's error names the path.
    blocker = tmp_path / "secret-state-dir"
    blocker.write_text("not a directory")
    client = make_client(store_url=f"sqlite:///{blocker / 'nonces.sqlite3'}")
    with caplog.at_level(logging.WARNING, logger="attest_service"):
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body == {"status": "unavailable",
                    "error": {"code": "store_unavailable", "message": "the nonce store does not answer"}}
    assert "secret-state-dir" not in response.get_data(as_text=True)
    # The operator still learns what failed, from the log.
    assert any("secret-state-dir" in record.getMessage() for record in caplog.records), caplog.text


def test_unreachable_redis_is_not_described_to_callers(make_client: AppFactory, redis: RedisServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    if not redis.running:
        redis.start()
    url = f"redis://:hunter2-password@{redis.host}:{redis.port}/0"
    client = make_client(store_url=url, ATTEST_STORE_TIMEOUT_SECONDS="0.2")
    redis.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="attest_service"):
            response = client.get("/readyz")
    finally:
        redis.start()
    assert response.status_code == 503
    text = response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "store_unavailable"
    for detail in (str(redis.port), redis.host, "hunter2", "Error", "refused"):
        assert detail not in text, (detail, text)
    assert any(str(redis.port) in record.getMessage() for record in caplog.records), caplog.text
    assert not any("hunter2" in record.getMessage() for record in caplog.records), caplog.text
