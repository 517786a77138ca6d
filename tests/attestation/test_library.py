"""The public library: ``from attest_service import ...`` as a Python license server uses it.

Real components throughout: the generated cases' pinned directory, real SQLite stores, real Redis where the
nonce must be shared, and the README's example run exactly as written.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import attest_service
from attest_service import (
    AttestError,
    Attestor,
    CallerPolicy,
    ConfigurationError,
    NonceReplayed,
    NonceUnknown,
    PolicyDenied,
    VerificationError,
    Verifier,
    open_store,
)
from attest_service.imds import pki
from attest_service.nonces import NonceStore
from tests.verify.conftest import REPO_ROOT, TESTCASES, case_input, case_instant, load_index

CASES = load_index()
OK = CASES["ok-rsa"]
AT = case_instant(OK)
RESPONSE_TEXT = case_input(OK).decode("utf-8")
RESPONSE = json.loads(RESPONSE_TEXT)


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.from_directory(TESTCASES / "pinned")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NonceStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'nonces.sqlite3'}")
    yield opened
    opened.close()


@pytest.mark.parametrize("form", ["dict", "json-text", "json-bytes", "bare-base64", "bare-base64-bytes"])
def test_verify_response_takes_every_form_a_caller_holds(verifier: Verifier, form: str) -> None:
    response = {"dict": RESPONSE, "json-text": RESPONSE_TEXT, "json-bytes": RESPONSE_TEXT.encode(),
                "bare-base64": RESPONSE["signature"], "bare-base64-bytes": RESPONSE["signature"].encode()}[form]
    result = verifier.verify_response(response, at=AT)
    assert (result.cloud, result.signer.sha256) == ("public", OK["signer_sha256"])
    assert result.claims == OK["claims"]


def test_claims_are_a_read_only_mapping_equal_to_the_signed_json(verifier: Verifier) -> None:
    claims = verifier.verify_response(RESPONSE, at=AT).claims
    assert isinstance(claims, Mapping)
    assert claims == OK["claims"]
    assert OK["claims"] == claims
    assert dict(claims)["plan"] == OK["claims"]["plan"]
    with pytest.raises(TypeError):
        claims["nonce"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        claims["plan"]["name"] = "other"  # type: ignore[index]
    assert claims != {**OK["claims"], "sku": "other"}


def test_claims_with_arrays_compare_equal_to_json_loads() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    content = json.dumps({"nonce": "n1", "vmId": "v", "list": ["a", ["b"], {"c": "d"}],
                          "timeStamp": {"createdOn": pki.imds_timestamp(now),
                                        "expiresOn": pki.imds_timestamp(now + timedelta(hours=6))}}).encode()
    signature = base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()
    pki.write_pinned_dir(pins := Path(pytest.importorskip("tempfile").mkdtemp()), "public", root=root.certificate,
                         intermediates=[issuing.certificate])
    result = Verifier.from_directory(pins).verify_response(signature, at=now)
    assert result.claims == json.loads(content)
    assert result.claims["list"] == ["a", ["b"], {"c": "d"}]


def test_bundled_pins_are_the_shipped_ones() -> None:
    verifier = Verifier.bundled()
    names = {pin.subject_cn for pin in verifier.trust.all_pins()}
    assert "Microsoft Azure RSA TLS Issuing CA 07" in names
    # A generated document does not chain to Azure's roots.
    with pytest.raises(VerificationError) as caught:
        verifier.verify_response(RESPONSE, at=AT)
    assert caught.value.code == "untrusted_chain"


def test_nonce_is_checked_when_given(verifier: Verifier) -> None:
    assert verifier.verify_response(RESPONSE, nonce=OK["claims"]["nonce"], at=AT).claims["nonce"] == "a1b2c3d4e5f60718"
    with pytest.raises(VerificationError) as caught:
        verifier.verify_response(RESPONSE, nonce="another", at=AT)
    assert caught.value.code == "nonce_mismatch"


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case["expect"] != "ok"))
def test_every_refusal_is_a_verification_error_with_the_case_code(verifier: Verifier, name: str) -> None:
    case = CASES[name]
    with pytest.raises(VerificationError) as caught:
        verifier.verify_response(case_input(case), cloud=case["policy"]["cloud"], nonce=case["policy"]["nonce"],
                                 at=case_instant(case))
    assert caught.value.code == case["expect"]


@pytest.mark.parametrize("response", [None, 7, [], ["a"], {}, {"signature": 5}, "", b"\xff\xfe", "{", "{}", "[]",
                                      "A" * 200_000, {"encoding": "pkcs7", "signature": "!!"}],
                         ids=repr)
def test_hostile_input_raises_only_verification_error(verifier: Verifier, response: object) -> None:
    with pytest.raises(VerificationError) as caught:
        verifier.verify_response(response, at=AT)  # type: ignore[arg-type]
    assert caught.value.code in ("malformed_document", "unsupported_document")


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"cloud": "mars"}, "cloud"), ({"cloud": ["public"]}, "cloud"), ({"nonce": 5}, "nonce"),
    ({"at": datetime(2025, 6, 1)}, "timezone"), ({"at": "2025-06-01"}, "timezone"),  # noqa: DTZ001
])
def test_unusable_arguments_raise_configuration_error(verifier: Verifier, kwargs: dict[str, object],
                                                      what: str) -> None:
    with pytest.raises(ConfigurationError, match=what):
        verifier.verify_response(RESPONSE, **kwargs)  # type: ignore[arg-type]
    assert issubclass(ConfigurationError, AttestError)


def test_from_directory_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Verifier.from_directory(tmp_path / "absent")


def test_one_verifier_serves_many_threads(verifier: Verifier) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.extend(str(verifier.verify_response(RESPONSE, at=AT).claims["vmId"]) for _ in range(20))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (errors, len(set(results)), len(results)) == ([], 1, 160)


# --- the attestation step ---------------------------------------------------------------------------


def test_attestor_accepts_a_nonce_once(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    attested = attestor.attest(RESPONSE, now=AT)
    assert (attested.document.claims["nonce"], attested.challenge, attested.nonce_checked) == (
        "a1b2c3d4e5f60718", False, False)
    with pytest.raises(NonceReplayed):
        attestor.attest(RESPONSE_TEXT, now=AT)


def test_a_denied_document_keeps_its_nonce(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    strict = CallerPolicy(client_id="license-server", subscriptions=frozenset({"00000000-0000-4000-8000-000000000000"}))
    with pytest.raises(PolicyDenied):
        attestor.attest(RESPONSE, now=AT, caller=strict)
    assert attestor.attest(RESPONSE, now=AT, caller=CallerPolicy(client_id="license-server")).challenge is False


def test_a_refused_document_burns_no_nonce(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    with pytest.raises(VerificationError):
        attestor.attest(RESPONSE, now=AT, nonce="something-else")
    attestor.attest(RESPONSE, now=AT)


def test_a_required_challenge_must_have_been_issued(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    with pytest.raises(NonceUnknown):
        attestor.attest(RESPONSE, now=AT, caller=CallerPolicy(client_id="vm-fleet", require_challenge=True))


def test_an_issued_challenge_is_consumed_once(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(tmp_path / "pins", "public", root=root.certificate, intermediates=[issuing.certificate])
    store = open_store(f"sqlite:///{tmp_path / 'nonces.sqlite3'}")
    attestor = Attestor(Verifier.from_directory(tmp_path / "pins"), store)
    challenge = attestor.issue_challenge(client_id="vm-fleet", now=now)
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", challenge.nonce)
    content = pki.attested_content(nonce=challenge.nonce, vm_id="v", subscription_id="s", sku="", plan=("", "", ""),
                                   license_type="", created_on=now, expires_on=now + timedelta(hours=6))
    response = {"encoding": "pkcs7", "signature": base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()}
    caller = CallerPolicy(client_id="vm-fleet", require_challenge=True)
    attested = attestor.attest(response, now=now, nonce=challenge.nonce, caller=caller)
    assert (attested.challenge, attested.nonce_checked) == (True, True)
    with pytest.raises(NonceReplayed):
        attestor.attest(response, now=now, nonce=challenge.nonce, caller=caller)
    store.close()


# --- README ----------------------------------------------------------------------------------------


def _readme_examples() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- library-example -->\n```python\n(.*?)```", text, re.DOTALL)


def test_readme_has_the_library_examples() -> None:
    assert len(_readme_examples()) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_readme_library_example_runs_as_written(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # The examples read a document from response.json, trust ./pinned_certs and keep nonces under ./state, as
    # a license server would: here a document signed now by a fresh Azure-shaped PKI.
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(tmp_path / "pinned_certs", "public", root=root.certificate,
                         intermediates=[issuing.certificate])
    content = pki.attested_content(nonce="readme-0001", vm_id="0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
                                   subscription_id="11111111-2222-4333-8444-555555555555", sku="20_04-lts-gen2",
                                   plan=("", "", ""), license_type="", created_on=now,
                                   expires_on=now + timedelta(hours=6))
    signature = base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()
    (tmp_path / "response.json").write_text(json.dumps({"encoding": "pkcs7", "signature": signature}),
                                            encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_examples()[index], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9" in out
    if index == 1:
        assert out.splitlines()[-1] == "refused: nonce_replayed"


def test_the_package_exports_what_it_documents() -> None:
    assert {"Verifier", "VerificationError", "AttestError", "Attestor", "CallerPolicy", "open_store"} <= set(
        attest_service.__all__)
