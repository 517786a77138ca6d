"""The application's results switch, in process: a default key that cannot be made leaves the service up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from attest_service.settings import Settings
from attest_service.web import create_app
from tests.verify.conftest import TESTCASES


def test_an_unwritable_state_directory_starts_the_service_with_results_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    settings = Settings.from_env({"ATTEST_PINNED_CERTS": str(TESTCASES / "pinned"),
                                  "ATTEST_NONCE_STORE": f"sqlite:///{blocker / 'nonces.sqlite3'}"})
    with caplog.at_level(logging.ERROR, logger="attest_service"):
        client = create_app(settings).test_client()
    assert "attestation results are off: ATTEST_RESULT_KEYS: cannot create the default key" in caplog.text
    assert client.get("/.well-known/jwks.json").status_code == 404
    assert client.get("/readyz").status_code == 503  # the store, in the same directory, reports it


def test_the_embedded_default_publishes_its_generated_key(tmp_path: Path) -> None:
    settings = Settings.from_env({"ATTEST_PINNED_CERTS": str(TESTCASES / "pinned"),
                                  "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}",
                                  "ATTEST_RESULT_ISSUER": "https://attest.example.com"})
    client = create_app(settings).test_client()
    jwks = client.get("/.well-known/jwks.json")
    assert jwks.status_code == 200
    assert jwks.headers["Cache-Control"] == "public, max-age=300"
    assert jwks.content_type == "application/jwk-set+json"
    (key,) = jwks.get_json()["keys"]
    assert (key["kty"], key["alg"], key["use"]) == ("EC", "ES256", "sig")
    assert "d" not in key
    discovery = client.get("/.well-known/openid-configuration")
    assert discovery.headers["Cache-Control"] == "public, max-age=300"
    assert discovery.get_json()["jwks_uri"] == "https://attest.example.com/.well-known/jwks.json"
    assert (tmp_path / "result-keys" / "generated.pem").stat().st_mode & 0o777 == 0o600
