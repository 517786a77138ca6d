"""The public library: ``from attest_service import ...`` as a Python license server uses it.

Real components throughout: the generated cases' pinned directory, real SQLite stores, real Redis where the
nonce must be shared (the README's examples run in tests/system/install/test_readme.py).
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
from attest_service.verify import VerificationPolicy
from tests.verify.conftest import TESTCASES, case_input, case_instant, load_index

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


def test_claims_with_arrays_compare_equal_to_json_loads(tmp_path: Path) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    content = json.dumps({"nonce": "n1", "vmId": "v", "list": ["a", ["b"], {"c": "d"}],
                          "timeStamp": {"createdOn": pki.imds_timestamp(now),
                                        "expiresOn": pki.imds_timestamp(now + timedelta(hours=6))}}).encode()
    signature = base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()
    pins = tmp_path / "pins"
    pki.write_pinned_dir(pins, "public", root=root.certificate, intermediates=[issuing.certificate])
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
                                 at=case_instant(case), revocation=case["policy"].get("revocation", "soft"))
    assert caught.value.code == case["expect"]


@pytest.mark.parametrize("response", [None, 7, [], ["a"], {}, {"signature": 5}, "", b"\xff\xfe", "{", "{}", "[]",
                                      "A" * 200_000, {"encoding": "pkcs7", "signature": "!!"}],
                         ids=repr)
def test_hostile_input_raises_only_verification_error(verifier: Verifier, response: object) -> None:
    with pytest.raises(VerificationError) as caught:
        verifier.verify_response(response, at=AT)  # type: ignore[arg-type]
    assert caught.value.code in ("malformed_document", "unsupported_document")


@pytest.mark.parametrize(("kwargs", "error", "what"), [
    ({"cloud": "mars"}, ValueError, "unknown cloud"), ({"cloud": ["public"]}, TypeError, "cloud"),
    ({"nonce": 5}, TypeError, "nonce"),
    ({"at": datetime(2025, 6, 1)}, ValueError, "timezone-aware"),  # noqa: DTZ001
    ({"at": "2025-06-01T00:00:00Z"}, TypeError, "not str"),
])
def test_a_wrong_argument_is_a_type_or_value_error(verifier: Verifier, kwargs: dict[str, object],
                                                   error: type[Exception], what: str) -> None:
    # A caller's programming error, not a refusal of the document nor an operator's bad setting.
    with pytest.raises(error, match=what) as caught:
        verifier.verify_response(RESPONSE, **kwargs)  # type: ignore[arg-type]
    assert not isinstance(caught.value, AttestError)


@pytest.mark.parametrize(("at", "error"), [(datetime(2025, 6, 1), ValueError),  # noqa: DTZ001
                                           ("2025-06-01T00:00:00Z", TypeError), (1748736000, TypeError)])
def test_the_attestor_refuses_a_wrong_instant_the_same_way(tmp_path: Path, at: object,
                                                          error: type[Exception]) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'n.sqlite3'}")
    attestor = Attestor(Verifier.from_directory(TESTCASES / "pinned"), store)
    with pytest.raises(error, match="at must be a timezone-aware datetime"):
        attestor.attest(RESPONSE, at=at)  # type: ignore[arg-type]
    with pytest.raises(error, match="at must be a timezone-aware datetime"):
        attestor.issue_challenge(at=at)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown cloud"):
        attestor.attest(RESPONSE, at=AT, cloud="mars")
    store.close()


def test_now_is_a_deprecated_name_of_at(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'n.sqlite3'}")
    attestor = Attestor(Verifier.from_directory(TESTCASES / "pinned"), store)
    with pytest.warns(DeprecationWarning, match="at="):
        assert attestor.attest(RESPONSE, now=AT).document.cloud == "public"
    with pytest.raises(TypeError, match="not also as now="), pytest.warns(DeprecationWarning, match="at="):
        attestor.attest(RESPONSE, at=AT, now=AT)
    store.close()


@pytest.mark.parametrize("field", ["clouds", "subscriptions", "plans", "skus", "license_types"])
def test_an_empty_allow_list_is_refused_as_the_policy_file_refuses_it(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}=...\\): an empty allow-list admits nothing"):
        CallerPolicy(client_id="license-server", **{field: frozenset()})


def test_open_store_names_the_url_not_a_variable() -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store("postgres://x")
    assert caught.value.message.startswith("nonce store URL 'postgres://x' is invalid: expected sqlite:///path")
    assert "ATTEST_" not in caught.value.message


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
    attested = attestor.attest(RESPONSE, at=AT)
    assert (attested.document.claims["nonce"], attested.challenge, attested.nonce_checked) == (
        "a1b2c3d4e5f60718", False, False)
    with pytest.raises(NonceReplayed):
        attestor.attest(RESPONSE_TEXT, at=AT)


def test_a_denied_document_keeps_its_nonce(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    strict = CallerPolicy(client_id="license-server", subscriptions=frozenset({"00000000-0000-4000-8000-000000000000"}))
    with pytest.raises(PolicyDenied):
        attestor.attest(RESPONSE, at=AT, caller=strict)
    assert attestor.attest(RESPONSE, at=AT, caller=CallerPolicy(client_id="license-server")).challenge is False


def test_a_refused_document_burns_no_nonce(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    with pytest.raises(VerificationError):
        attestor.attest(RESPONSE, at=AT, nonce="something-else")
    attestor.attest(RESPONSE, at=AT)


def test_a_required_challenge_must_have_been_issued(verifier: Verifier, store: NonceStore) -> None:
    attestor = Attestor(verifier, store)
    with pytest.raises(NonceUnknown):
        attestor.attest(RESPONSE, at=AT, caller=CallerPolicy(client_id="vm-fleet", require_challenge=True))


def test_an_issued_challenge_is_consumed_once(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(tmp_path / "pins", "public", root=root.certificate, intermediates=[issuing.certificate])
    store = open_store(f"sqlite:///{tmp_path / 'nonces.sqlite3'}")
    attestor = Attestor(Verifier.from_directory(tmp_path / "pins"), store)
    challenge = attestor.issue_challenge(client_id="vm-fleet", at=now)
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", challenge.nonce)
    content = pki.attested_content(nonce=challenge.nonce, vm_id="v", subscription_id="s", sku="", plan=("", "", ""),
                                   license_type="", created_on=now, expires_on=now + timedelta(hours=6))
    response = {"encoding": "pkcs7", "signature": base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()}
    caller = CallerPolicy(client_id="vm-fleet", require_challenge=True)
    attested = attestor.attest(response, at=now, nonce=challenge.nonce, caller=caller)
    assert (attested.challenge, attested.nonce_checked) == (True, True)
    with pytest.raises(NonceReplayed):
        attestor.attest(response, at=now, nonce=challenge.nonce, caller=caller)
    store.close()


def test_the_package_exports_what_it_documents() -> None:
    assert {"Verifier", "VerificationError", "AttestError", "Attestor", "CallerPolicy", "open_store"} <= set(
        attest_service.__all__)


def test_the_verifier_takes_the_instant_as_at_like_every_public_call(verifier: Verifier) -> None:
    der = verifier.decode(RESPONSE)
    assert verifier.verify(der, policy=VerificationPolicy(), at=AT).claims == OK["claims"]
    assert verifier.verify(der, policy=VerificationPolicy(), now=AT).claims == OK["claims"]  # the former name
    with pytest.raises(TypeError, match="exactly once"):
        verifier.verify(der, policy=VerificationPolicy())
    with pytest.raises(ValueError, match="timezone-aware"):
        verifier.verify(der, policy=VerificationPolicy(), at=datetime(2025, 6, 1))  # noqa: DTZ001
