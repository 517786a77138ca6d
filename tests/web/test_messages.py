"""Answers carry our sentence; what a library said about the document goes to the log, at debug only."""

from __future__ import annotations

import logging

import pytest

from .conftest import AppFactory


def test_the_answer_is_ours_and_the_librarys_detail_is_logged_at_debug(make_client: AppFactory,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(ATTEST_LOG_LEVEL="debug")
    with caplog.at_level(logging.DEBUG, logger="attest_service"):
        response = client.post("/v1/verify", json={"signature": "AAAAA"})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error == {"code": "malformed_document",
                     "message": "signature: not strict base64 (the standard alphabet, padded with '=' to a "
                                "multiple of 4 characters, nothing else)"}
    details = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]
    assert any("malformed_document" in line and "detail: Error: " in line and "1 more than a multiple of 4" in line
               for line in details), details


def test_without_debug_the_detail_is_not_logged(make_client: AppFactory, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    with caplog.at_level(logging.INFO, logger="attest_service"):
        assert client.post("/v1/verify", json={"signature": "AAAAA"}).status_code == 422
    assert not [record for record in caplog.records if "detail:" in record.getMessage()]
