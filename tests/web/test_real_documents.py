"""Real Azure documents through the REST API, verified at their own instants with the bundled pins."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from attest_service.settings import Settings
from attest_service.web import create_app
from tests.support.azure_real import azure_real_dir, entry_params, real_documents, require
from tests.web.conftest import Clock


@pytest.fixture(scope="module")
def documents() -> Path:
    """The real documents (skips when they are absent, fails under CI)."""
    return real_documents()


def _client(tmp_path: Path, instant: datetime):
    # Open: the real documents carry the nonces their VMs chose.
    settings = Settings.from_env({"ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}",
                                  "ATTEST_ALLOW_OPEN": "1"})
    return create_app(settings, clock=Clock(instant)).test_client()


@pytest.mark.parametrize("entry", entry_params())
def test_real_document_verifies_once(entry: dict[str, object], documents: Path, tmp_path: Path) -> None:
    instant = datetime.fromisoformat(str(entry["verify_at"]).replace("Z", "+00:00"))
    client = _client(tmp_path, instant)
    document = json.loads((documents / str(entry["document"])).read_text())
    response = client.post("/v1/verify", json={"document": document})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["cloud"] == entry["cloud"]
    assert body["claims"] == entry["claims"]
    assert client.post("/v1/verify", json={"signature": document["signature"]}).get_json()["error"]["code"] == (
        "nonce_replayed")


#: Each tampered copy of the 2019 document and the one code it must get (see tests/verify/test_real_documents.py):
#: the message-tampered copy also carries a trailing newline inside its base64, which strict DER refuses.
TAMPERED = {"tc-2019-12-13-azure-message-bad.json": "malformed_document",
            "tc-2019-12-13-azure-signature-bad.json": "signature_invalid"}


@pytest.mark.parametrize(("name", "code"), TAMPERED.items())
def test_tampered_real_document_is_refused(name: str, code: str, tmp_path: Path) -> None:
    path = require(azure_real_dir() / "negative" / name, "negative real document")
    client = _client(tmp_path, datetime.fromisoformat("2019-12-13T00:34:40+00:00"))
    response = client.post("/v1/verify", json={"document": json.loads(path.read_text())})
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == code
