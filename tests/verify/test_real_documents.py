"""Real documents signed by Azure: accepted at their own instant with the bundled pins, refused otherwise.

The documents live outside the repository (``$ATTEST_AZURE_REAL_DIR``, default ``../shared/azure-real``);
``documents/expected.json`` gives each one's cloud, an instant inside its signer's validity, the issuing CA
and the exact signed claims. The tests skip when the directory is absent, and fail so under CI
(tests/support/azure_real.py).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from attest_service.errors import VerificationError
from attest_service.trust import TrustStore, bundled_pinned_dir, load_trust, manifest_entry
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode
from attest_service.verify.claims import parse_claims
from attest_service.verify.pkcs7 import parse_signed_data
from tests.support.azure_real import azure_real_dir, entry_params, expected_entries, require

from .conftest import REPO_ROOT

EXPECTED: list[dict[str, Any]] = expected_entries()
NEGATIVE = azure_real_dir() / "negative"


#: One parameter per real document, or a placeholder that the ``real_documents`` fixture skips (CI: fails).
ENTRIES = entry_params(EXPECTED)


@pytest.fixture(scope="module")
def bundled() -> TrustStore:
    return load_trust(bundled_pinned_dir())


@pytest.fixture(scope="module")
def shared_verifier(bundled: TrustStore) -> DocumentVerifier:
    return DocumentVerifier(bundled)


def _document(real_documents: Path, entry: dict[str, Any]) -> bytes:
    return decode((real_documents / entry["document"]).read_bytes())


def _issuer_cn(rfc4514: str) -> str:
    match = re.match(r"CN=((?:[^,\\]|\\.)*)", rfc4514)
    assert match is not None, rfc4514
    return match.group(1)


def test_expected_list_is_present(real_documents: Path) -> None:
    assert len(EXPECTED) >= 10
    assert {entry["document"] for entry in EXPECTED} == {p.name for p in real_documents.glob("*.json")
                                                         if p.name != "expected.json"}


@pytest.mark.parametrize("cloud", ["auto", "public"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_real_document_verifies_at_its_instant(entry: dict[str, Any], cloud: str, real_documents: Path,
                                                 bundled: TrustStore, shared_verifier: DocumentVerifier) -> None:
    instant = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
    policy = VerificationPolicy(cloud=cloud)
    # A fresh DocumentVerifier and a long-lived one (with whatever the other documents left in its cache) agree.
    for verifier in (DocumentVerifier(bundled), shared_verifier):
        result = verifier.verify(_document(real_documents, entry), policy=policy, now=instant)
        body = result.to_dict()
        assert body["cloud"] == entry["cloud"]
        assert body["claims"] == entry["claims"]
        assert _issuer_cn(result.signer.issuer) == entry["signer_issuer_cn"]
        assert _issuer_cn(result.signer.chain[1]) == entry["signer_issuer_cn"]
        assert len(result.signer.chain) >= 3
        assert any(name == "metadata.azure.com" or name.endswith(".metadata.azure.com")
                   for name in result.signer.dns_names)


@pytest.mark.parametrize("entry", ENTRIES)
def test_real_document_nonce_and_cloud_checks(entry: dict[str, Any], real_documents: Path,
                                              shared_verifier: DocumentVerifier) -> None:
    instant = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
    document = _document(real_documents, entry)
    nonce = entry["claims"]["nonce"]
    assert shared_verifier.verify(document, policy=VerificationPolicy(expected_nonce=nonce), now=instant)
    with pytest.raises(VerificationError) as caught:
        shared_verifier.verify(document, policy=VerificationPolicy(expected_nonce=nonce + "0"), now=instant)
    assert caught.value.code == "nonce_mismatch"
    for other_cloud in ("usgov", "china", "germany"):
        with pytest.raises(VerificationError) as caught:
            shared_verifier.verify(document, policy=VerificationPolicy(cloud=other_cloud), now=instant)
        assert caught.value.code == "subject_mismatch"


@pytest.mark.parametrize("entry", ENTRIES)
def test_real_document_is_refused_now(entry: dict[str, Any], real_documents: Path, bundled: TrustStore) -> None:
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(bundled).verify(_document(real_documents, entry), policy=VerificationPolicy(),
                                 now=datetime.now(UTC))
    assert caught.value.code in {"certificate_expired", "document_expired"}


def _negative(name: str) -> Path:
    return require(NEGATIVE / name, "negative real document")


def _verify_at_creation(der: bytes, bundled: TrustStore, cloud: str = "auto") -> str:
    created = parse_claims(parse_signed_data(der).content).created_on
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(bundled).verify(der, policy=VerificationPolicy(cloud=cloud), now=created)
    return caught.value.code


#: The instant the 2019 document and its tampered copies are verified at (inside the signer's validity).
TAMPERED_AT = datetime(2019, 12, 13, 0, 34, 40, tzinfo=UTC)


def _tampered_code(der: bytes, bundled: TrustStore) -> str:
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(bundled).verify(der, policy=VerificationPolicy(), now=TAMPERED_AT)
    return caught.value.code


def test_tampered_message_is_refused_for_its_trailing_byte(bundled: TrustStore) -> None:
    # The published copy's base64 also encodes a newline after the ContentInfo (its provenance note: "1 byte
    # longer"): strict DER refuses it at step 2, before the changed vmId could be noticed.
    der = decode(_negative("tc-2019-12-13-azure-message-bad.json").read_bytes())
    assert der.endswith(b"\n")
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(bundled).verify(der, policy=VerificationPolicy(), now=TAMPERED_AT)
    assert caught.value.code == "malformed_document"
    assert "trailing" in caught.value.message


def test_tampered_message_without_its_trailing_byte_fails_the_signature(bundled: TrustStore) -> None:
    # Without the newline the DER is the genuine document's but for one vmId character: only step 4 can
    # tell: the signature no longer verifies over the changed content.
    der = decode(_negative("tc-2019-12-13-azure-message-bad.json").read_bytes())
    assert _tampered_code(der[:-1], bundled) == "signature_invalid"


def test_tampered_signature_is_refused(bundled: TrustStore) -> None:
    der = decode(_negative("tc-2019-12-13-azure-signature-bad.json").read_bytes())
    assert _tampered_code(der, bundled) == "signature_invalid"
    assert _verify_at_creation(der, bundled) == "signature_invalid"


@pytest.mark.parametrize("cloud", ["auto", "public"])
def test_wrong_subject_pkcs7_is_refused(cloud: str, bundled: TrustStore) -> None:
    # Signed by CN=metadata.azure.org under a test root: the name (step 5) is judged before the chain (step 6).
    pem = _negative("tc-2020-11-15-azure-wrong-subject.pkcs7.pem").read_text(encoding="ascii")
    body = re.search(r"-----BEGIN PKCS7-----(.+?)-----END PKCS7-----", pem, re.DOTALL)
    assert body is not None
    der = base64.b64decode("".join(body.group(1).split()), validate=True)
    assert _verify_at_creation(der, bundled, cloud) == "subject_mismatch"


@pytest.mark.slow
def test_verify_command_on_a_real_document(real_documents: Path) -> None:
    entry = EXPECTED[-1]
    completed = subprocess.run(
        [sys.executable, "-m", "attest_service", "verify", "--at", entry["verify_at"],
         str(real_documents / entry["document"])],
        capture_output=True, cwd=REPO_ROOT, timeout=60, check=False)
    assert completed.returncode == 0, completed.stdout
    payload = json.loads(completed.stdout)
    assert payload["claims"] == entry["claims"]
    assert payload["cloud"] == entry["cloud"]


# --- the bundled pins' manifest ------------------------------------------------------------------------


def _manifest() -> list[dict[str, str]]:
    path = bundled_pinned_dir() / "manifest.json"
    assert path.is_file(), "pinned_certs/manifest.json is missing"
    entries: list[dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))["certificates"]
    return entries


def test_manifest_matches_the_pinned_files(bundled: TrustStore) -> None:
    manifest = _manifest()
    recorded = {(e["cloud"], e["role"], e["sha256"]): e for e in manifest}
    assert len(recorded) == len(manifest), "duplicate manifest entries"
    loaded = {(pin.cloud, pin.role, pin.sha256): pin for pin in bundled.all_pins()}
    assert set(recorded) == set(loaded)
    for key, pin in loaded.items():
        entry = dict(recorded[key])
        # A retired pin is an expired one kept on purpose, and says why.
        retired = entry.pop("retired", None)
        assert retired is None or (retired.strip() and pin.not_after < datetime.now(UTC)), entry
        expected = manifest_entry(pin, entry["source"])
        if pin.source == "certifi":
            # Roots taken from certifi are recorded against the list file that names them.
            expected["file"] = f"{pin.cloud}/roots/certifi.txt"
        assert entry == expected
        assert entry["source"].strip()
    for cloud in bundled.clouds.values():
        assert not cloud.problems, cloud.problems


def test_every_pinned_file_is_in_the_manifest() -> None:
    base = bundled_pinned_dir()
    # Certificates and certifi lists; placeholder files that keep empty directories in version control aside.
    files = {p.relative_to(base).as_posix() for p in base.rglob("*")
             if p.is_file() and (p.suffix == ".pem" or p.name == "certifi.txt")}
    assert files == {e["file"] for e in _manifest()}
