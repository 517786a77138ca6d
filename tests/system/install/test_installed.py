"""What users run: each installation's own console script, outside the source tree.

For the image's environment and for a plain ``pip install <wheel>`` (tests/system/install/conftest.py): ``verify``
of real documents through the pins bundled in the wheel (no flag, no variable), ``verify`` of an emulator's
document through that emulator's pins, ``certs list``, ``certs check``, ``serve`` with the shipped worker class
answering a challenge, a verification and a replay, and the ``imds-emulator`` -> ``attest`` round trip.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.azure_real import entry_params, expected_entries, real_documents
from tests.support.service import ServiceProcess, running_service

from .conftest import Emulator, Installation, imds_emulator

pytestmark = pytest.mark.slow

#: The attested-document API version that ``attest`` asks IMDS for by default.
IMDS_API_VERSION = "2021-02-01"
#: Seconds one request to the emulator may take.
REQUEST_TIMEOUT_SECONDS = 10


def _oldest_and_newest(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Two documents whose chains end in different bundled roots (Baltimore, then Microsoft's G2), so the
    # bundled directory is read in full; tests/verify verifies every real document in-process.
    ordered = sorted(entries, key=lambda entry: str(entry["verify_at"]))
    return [ordered[0], ordered[-1]] if len(ordered) > 1 else ordered


@pytest.fixture(scope="module")
def documents() -> Path:
    """The real documents (skips when they are absent, fails under CI)."""
    return real_documents()


@dataclass(frozen=True, slots=True)
class Deployment:
    """An installation's emulator (its PKI pinned in a directory) and its service trusting that directory."""

    installation: Installation
    emulator: Emulator
    service: ServiceProcess

    def fetch_document(self, nonce: str) -> dict[str, object]:
        """The emulator's attested document for ``nonce``, as IMDS answers it (``Metadata: true``)."""
        url = urllib.parse.urlsplit(self.emulator.url)
        query = urllib.parse.urlencode({"api-version": IMDS_API_VERSION, "nonce": nonce})
        connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            connection.request("GET", f"/metadata/attested/document?{query}", headers={"Metadata": "true"})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert response.status == 200, body
        document: dict[str, object] = json.loads(body)
        return document


@pytest.fixture(scope="session")
def deployment(installation: Installation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One emulator and one ``serve`` (SQLite store in a temporary directory) per installation."""
    root = tmp_path_factory.mktemp(f"deployment-{installation.name}")
    with ExitStack() as stack:
        emulator = stack.enter_context(imds_emulator(installation, root / "pki"))
        env = {"ATTEST_PINNED_CERTS": str(emulator.pki_dir),
               "ATTEST_NONCE_STORE": f"sqlite:///{root / 'nonces.sqlite3'}"}
        service = stack.enter_context(running_service(env, root, workers=1, command=[installation.script]))
        yield Deployment(installation, emulator, service)


def test_package_is_imported_from_the_installation(installation: Installation) -> None:
    location = installation.python("import attest_service; print(attest_service.__file__)").strip()
    assert Path(location).is_relative_to(installation.venv), location


@pytest.mark.parametrize("entry", entry_params(_oldest_and_newest(expected_entries())))
def test_verify_real_document_with_bundled_pins(documents: Path, installation: Installation,
                                               entry: dict[str, Any]) -> None:
    result = installation.run("verify", "--at", str(entry["verify_at"]), str(documents / str(entry["document"])))
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = json.loads(result.stdout)
    assert (verdict["verified"], verdict["cloud"], verdict["claims"]) == (True, entry["cloud"], entry["claims"])


def test_verify_generated_document_with_emulator_pins(deployment: Deployment) -> None:
    installation = deployment.installation
    document = installation.workdir / "generated.json"
    document.write_text(json.dumps(deployment.fetch_document("offline-nonce-1")), encoding="utf-8")
    result = installation.run("verify", "--pinned-certs", str(deployment.emulator.pki_dir), "--cloud", "public",
                              "--nonce", "offline-nonce-1", str(document))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["claims"]["nonce"] == "offline-nonce-1"
    # The bundled pins trust Azure only: the same document without --pinned-certs is refused, cleanly.
    refused = installation.run("verify", "--cloud", "public", str(document))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert json.loads(refused.stdout)["error"]["code"] == "untrusted_chain"


def test_certs_list_shows_every_bundled_pin(installation: Installation) -> None:
    result = installation.run("certs", "list")
    assert result.returncode == 0, result.stdout + result.stderr
    pinned = Path(__file__).resolve().parents[3] / "pinned_certs"
    for pem in sorted(pinned.glob("*/*/*.pem")):
        assert f"file:{pem.relative_to(pinned).as_posix()}" in result.stdout, pem


def test_certs_check_passes_on_the_bundled_pins(installation: Installation) -> None:
    # What a new operator runs first: the expired CAs kept to verify old documents are retired, not problems.
    result = installation.run("certs", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "retired: public: intermediate Microsoft IT TLS CA 4" in result.stdout
    assert " 0 problems, " in result.stdout
    strict = installation.run("certs", "check", "--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "expired: public: intermediate Microsoft IT TLS CA 4" in strict.stdout


def test_serve_starts_with_the_bundled_pins(installation: Installation, tmp_path: Path) -> None:
    # No ATTEST_PINNED_CERTS: serve loads the pins inside the package before it becomes gunicorn (exit 2 if
    # they were missing), and its workers answer.
    # No internet in tests: the bundled China pins' CA is not fetched in the background.
    env = {"ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}", "ATTEST_FINGERPRINT_FETCH": "0"}
    with running_service(env, tmp_path, workers=1, command=[installation.script]) as service:
        assert service.get("/readyz").status == 200
        assert service.post("/v1/challenges").status == 201


def test_serve_with_the_shipped_worker_verifies_once(deployment: Deployment) -> None:
    service = deployment.service
    assert "Using worker: attest_service.server.workers.GeventWorker" in service.log_tail(characters=100_000), \
        service.log_tail()
    challenge = service.post("/v1/challenges")
    assert challenge.status == 201, challenge.body
    nonce = str(challenge.body["nonce"])
    body = {"document": deployment.fetch_document(nonce), "nonce": nonce, "cloud": "public"}
    first = service.post("/v1/verify", body)
    assert first.status == 200, first.body
    assert first.body["verified"] is True
    assert first.body["claims"]["nonce"] == nonce  # type: ignore[index]
    replay = service.post("/v1/verify", body)
    assert (replay.status, replay.code) == (409, "nonce_replayed")


def test_emulator_to_attest_round_trip(deployment: Deployment) -> None:
    result = deployment.installation.run("attest", "--service", deployment.service.url,
                                         "--imds-url", deployment.emulator.url, "--cloud", "public")
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = json.loads(result.stdout)
    assert (verdict["verified"], verdict["cloud"]) == (True, "public")
