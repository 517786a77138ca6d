"""The web layer's own log lines about failed requests hold outside text escaped, one record per line."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from attest_service.errors import ConfigurationError, StoreUnavailable
from attest_service.web.errors import error_response

FORGED = "\n2026-12-05 10:00:00,000 CRITICAL attest_service: all pins removed"


@pytest.mark.parametrize("error", [StoreUnavailable(f"reply {FORGED}"), ConfigurationError(f"bug {FORGED}")],
                         ids=["store unavailable", "unmapped error"])
def test_error_messages_reach_the_log_escaped(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with Flask(__name__).app_context(), caplog.at_level(logging.DEBUG, logger="attest_service.web"):
        error_response(error)  # type: ignore[arg-type]
    [message] = [record.getMessage() for record in caplog.records]
    assert "\n" not in message
    assert "\\n2026-12-05 10:00:00,000 CRITICAL" in message
