"""Behaviour of the REST API over HTTP (Flask test client), with real SQLite and Redis stores.

Every error code of the contract is reached here once, asserting status and code.
"""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime, timedelta

import pytest
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from attest_service.imds import pki
from attest_service.nonces import CACHED_DOCUMENT_HINT
from tests.web.conftest import API_KEYS_ENV, NOW, SUBSCRIPTION, AppFactory, Clock, GeneratedPki, bearer


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["verified"] is False
    assert set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


def challenge(client: FlaskClient, **headers: str) -> str:
    response = client.post("/v1/challenges", headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["nonce"]


# --- success paths ---------------------------------------------------------------------------------


def test_challenge_then_verify_then_replay(make_client: AppFactory, store_url: str, test_pki: GeneratedPki) -> None:
    client = make_client(store_url=store_url)
    response = client.post("/v1/challenges")
    assert response.status_code == 201
    body = response.get_json()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", body["nonce"])
    assert datetime.fromisoformat(body["expiresAt"]) == NOW + timedelta(seconds=300)

    payload = {"document": test_pki.document(nonce=body["nonce"]), "nonce": body["nonce"]}
    first = client.post("/v1/verify", json=payload)
    assert first.status_code == 200, first.get_data(as_text=True)
    verified = first.get_json()
    assert verified["verified"] is True
    assert verified["cloud"] == "public"
    assert verified["claims"]["nonce"] == body["nonce"]
    assert verified["claims"]["subscriptionId"] == SUBSCRIPTION
    assert list(verified["claims"]) == ["licenseType", "nonce", "plan", "sku", "subscriptionId", "timeStamp", "vmId"]
    assert verified["signer"]["subject"].startswith("CN=metadata.azure.com,")
    assert verified["nonce"] == {"value": body["nonce"], "checked": True, "challenge": True}

    assert error_of(client.post("/v1/verify", json=payload), 409) == "nonce_replayed"


def test_bare_signature_with_caller_nonce(client: FlaskClient, test_pki: GeneratedPki) -> None:
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="my-own-nonce-1")})
    assert response.status_code == 200
    assert response.get_json()["nonce"] == {"value": "my-own-nonce-1", "checked": False, "challenge": False}
    replay = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="my-own-nonce-1")})
    assert error_of(replay, 409) == "nonce_replayed"


def test_a_bare_signature_is_base64_only(client: FlaskClient, test_pki: GeneratedPki) -> None:
    # The response object written into 'signature' is not unwrapped: 'signature' is the base64 itself.
    wrapped = json.dumps({"encoding": "pkcs7", "signature": test_pki.signature(nonce="wrapped-nonce")})
    assert error_of(client.post("/v1/verify", json={"signature": wrapped}), 422) == "malformed_document"
    # Whitespace around it is allowed, as always; the document still verifies once.
    padded = "\n " + test_pki.signature(nonce="padded-nonce") + " \n"
    assert client.post("/v1/verify", json={"signature": padded}).status_code == 200


def test_explicit_cloud(client: FlaskClient, test_pki: GeneratedPki) -> None:
    response = client.post("/v1/verify", json={"signature": test_pki.signature(), "cloud": "public"})
    assert response.status_code == 200


def test_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-Id": "bad id {\"x\": 1}"}).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_health_ready_openapi_metrics(client: FlaskClient, test_pki: GeneratedPki) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/v1/challenges", "/v1/verify", "/healthz", "/readyz", "/metrics", "/openapi.json",
                                  "/.well-known/jwks.json", "/.well-known/openid-configuration"}
    # The counters are process-wide and earlier tests moved them: compare what this request added.
    verified = 'attest_verifications_total{code="none",result="verified"}'
    refused = 'attest_verifications_total{code="nonce_replayed",result="refused"}'
    before = metric_samples(client.get("/metrics").get_data(as_text=True))
    signature = test_pki.signature()
    assert client.post("/v1/verify", json={"signature": signature}).status_code == 200
    assert client.post("/v1/verify", json={"signature": signature}).status_code == 409
    after = metric_samples(client.get("/metrics").get_data(as_text=True))
    assert after[verified] - before.get(verified, 0.0) == 1
    assert after[refused] - before.get(refused, 0.0) == 1


def metric_samples(text: str) -> dict[str, float]:
    """Each sample line of a Prometheus exposition, ``name{labels}`` -> value."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# --- one test per error code -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"not json",
    b"[1, 2]",
    b'{"signature": "AAAA", "signature": "AAAA"}',
    b'{"signature": 5}',
    b'{"document": "a string"}',
    b"{}",
    b'{"signature": "AAAA", "document": {"encoding": "pkcs7", "signature": "AAAA"}}',
    b'{"signature": "AAAA", "extra": 1}',
    b'{"signature": "AAAA", "nonce": 7}',
    b'{"signature": "AAAA", "nonce": "' + b"x" * 33 + b'"}',
    b'{"signature": "AAAA", "cloud": "mars"}',
    b'{"signature": "AAAA", "nonce": NaN}',
])
def test_malformed_request(client: FlaskClient, body: bytes) -> None:
    response = client.post("/v1/verify", data=body, content_type="application/json")
    assert error_of(response, 400) == "malformed_request"


def test_unauthorized(make_client: AppFactory) -> None:
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"},
                    {"Authorization": "Bearer "}):
        response = client.post("/v1/challenges", headers=headers)
        assert error_of(response, 401) == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(client.post("/v1/verify", json={"signature": "AAAA"}), 401) == "unauthorized"
    assert client.post("/v1/challenges", headers=bearer("billing")).status_code == 201


def test_policy_denied(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    policy = '[clients.license-server]\nsubscriptions = ["someone-else"]\n'
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, policy=policy)
    payload = {"signature": test_pki.signature(nonce="denied-nonce")}
    response = client.post("/v1/verify", json=payload, headers=bearer("license-server"))
    assert error_of(response, 403) == "policy_denied"
    assert f"subscription {SUBSCRIPTION} is not in the allow-list of client license-server" in (
        response.get_json()["error"]["message"])
    # The denied document did not burn its nonce: a client allowed to use it still can.
    assert client.post("/v1/verify", json=payload, headers=bearer("billing")).status_code == 200


def test_nonce_replayed(client: FlaskClient, test_pki: GeneratedPki) -> None:
    payload = {"signature": test_pki.signature(nonce="replayed-once")}
    assert client.post("/v1/verify", json=payload).status_code == 200
    assert error_of(client.post("/v1/verify", json=payload), 409) == "nonce_replayed"


def test_challenge_replay_names_cached_document(client: FlaskClient, test_pki: GeneratedPki) -> None:
    nonce = challenge(client)
    payload = {"signature": test_pki.signature(nonce=nonce)}
    assert client.post("/v1/verify", json=payload).status_code == 200
    response = client.post("/v1/verify", json=payload)
    assert error_of(response, 409) == "nonce_replayed"
    assert CACHED_DOCUMENT_HINT in response.get_json()["error"]["message"]


def test_request_too_large(client: FlaskClient) -> None:
    body = b'{"signature": "' + b"A" * (1024 * 1024) + b'"}'
    response = client.post("/v1/verify", data=body, content_type="application/json")
    assert error_of(response, 413) == "request_too_large"


def test_malformed_document(client: FlaskClient) -> None:
    response = client.post("/v1/verify", json={"signature": "!!not base64!!"})
    assert error_of(response, 422) == "malformed_document"
    response = client.post("/v1/verify", json={"signature": base64.b64encode(b"\x30\x03junk").decode()})
    assert error_of(response, 422) == "malformed_document"


def test_a_genuine_signature_over_an_unpaired_surrogate_is_malformed_not_a_500(client: FlaskClient,
                                                                              test_pki: GeneratedPki) -> None:
    # The signature verifies, but the content's vmId (or nonce) escapes half a surrogate pair: no UTF-8 can hold
    # it, and the nonce store digests both as UTF-8. Refused with our code; nothing is recorded.
    for field in ("vm_id", "nonce"):
        content = test_pki.content(**{field: "HALF-A-PAIR"}).replace(b"HALF-A-PAIR", b"\\ud800")
        signature = base64.b64encode(pki.sign_attested(content, signer=test_pki.leaf)).decode()
        response = client.post("/v1/verify", json={"signature": signature})
        assert error_of(response, 422) == "malformed_document", field
    after = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="after-half-a-pair")})
    assert after.status_code == 200


def test_unsupported_document(client: FlaskClient, test_pki: GeneratedPki) -> None:
    document = {"encoding": "jws", "signature": test_pki.signature()}
    assert error_of(client.post("/v1/verify", json={"document": document}), 422) == "unsupported_document"


def test_signature_invalid(client: FlaskClient, test_pki: GeneratedPki) -> None:
    content = test_pki.content(nonce="tampered-nonce")
    der = pki.sign_attested(content, signer=test_pki.leaf)
    tampered = der.replace(b"tampered-nonce", b"tampered-nonca")
    response = client.post("/v1/verify", json={"signature": base64.b64encode(tampered).decode()})
    assert error_of(response, 422) == "signature_invalid"


def test_untrusted_chain(client: FlaskClient, foreign_pki: tuple[pki.CertifiedKey, ...],
                         test_pki: GeneratedPki) -> None:
    response = client.post("/v1/verify", json={"signature": test_pki.signature(signer=foreign_pki[2])})
    assert error_of(response, 422) == "untrusted_chain"


def test_certificate_expired(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    later = NOW + timedelta(days=400)  # the leaf is valid for 365 days
    client = make_client(clock=Clock(later))
    response = client.post("/v1/verify", json={"signature": test_pki.signature(created_on=later)})
    assert error_of(response, 422) == "certificate_expired"


def test_subject_mismatch(client: FlaskClient, test_pki: GeneratedPki) -> None:
    signer = test_pki.leaf_named("metadata.azure.com.evil.example")
    response = client.post("/v1/verify", json={"signature": test_pki.signature(signer=signer)})
    assert error_of(response, 422) == "subject_mismatch"


def test_nonce_mismatch(client: FlaskClient, test_pki: GeneratedPki) -> None:
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="signed"), "nonce": "other"})
    assert error_of(response, 422) == "nonce_mismatch"
    # The document was not accepted: its nonce is still usable.
    assert client.post("/v1/verify", json={"signature": test_pki.signature(nonce="signed")}).status_code == 200


def test_nonce_mismatch_on_an_earlier_challenge_hints_at_cached_document(client: FlaskClient,
                                                                          test_pki: GeneratedPki) -> None:
    old, new = challenge(client), challenge(client)
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce=old), "nonce": new})
    assert error_of(response, 422) == "nonce_mismatch"
    assert CACHED_DOCUMENT_HINT in response.get_json()["error"]["message"]


def _total(metric: str) -> float:
    """The sum of ``metric``'s samples over every label (this process's registry)."""
    return sum(sample.value for family in REGISTRY.collect() for sample in family.samples
               if sample.name == metric)


def test_a_nonce_mismatch_counts_once_as_a_refusal_never_as_a_verified_document(client: FlaskClient,
                                                                                test_pki: GeneratedPki) -> None:
    # The registry is the process's: other tests count too, so this one compares its own before and after.
    counters = ("attest_verifications_by_issuer_total", "attest_revocation_unknown_total")
    before = {name: _total(name) for name in counters}
    refused = _total("attest_verifications_total")
    old, new = challenge(client), challenge(client)
    for signed, expected in ((old, new), ("signed", "other")):  # the earlier-challenge hint, and a plain mismatch
        response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce=signed), "nonce": expected})
        assert error_of(response, 422) == "nonce_mismatch"
    assert {name: _total(name) for name in counters} == before
    assert _total("attest_verifications_total") == refused + 2
    # A document with the expected nonce is counted, once, in each: the counters above do count this client.
    assert client.post("/v1/verify", json={"signature": test_pki.signature(nonce=new), "nonce": new}).status_code == 200
    assert {name: _total(name) for name in counters} == {name: value + 1 for name, value in before.items()}


def test_nonce_unknown(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    policy = "[anonymous]\nrequire_challenge = true\n"
    client = make_client(policy=policy)
    response = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="never-issued")})
    assert error_of(response, 422) == "nonce_unknown"
    nonce = challenge(client)
    assert client.post("/v1/verify", json={"signature": test_pki.signature(nonce=nonce)}).status_code == 200


def test_document_expired(make_client: AppFactory, test_pki: GeneratedPki) -> None:
    client = make_client(clock=Clock(NOW + timedelta(hours=7)))
    response = client.post("/v1/verify", json={"signature": test_pki.signature()})
    assert error_of(response, 422) == "document_expired"


def test_document_not_yet_valid(client: FlaskClient, test_pki: GeneratedPki) -> None:
    response = client.post("/v1/verify", json={"signature": test_pki.signature(created_on=NOW + timedelta(hours=1))})
    assert error_of(response, 422) == "document_not_yet_valid"


def test_rate_limited(make_client: AppFactory, store_url: str) -> None:
    client = make_client(store_url=store_url, ATTEST_RATE_LIMIT_PER_MINUTE="3")
    for _ in range(3):
        assert client.post("/v1/challenges").status_code == 201
    response = client.post("/v1/verify", json={"signature": "AAAA"})  # the two routes share one budget
    assert error_of(response, 429) == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1


def test_store_unavailable_then_recovers(make_client: AppFactory, redis, test_pki: GeneratedPki) -> None:
    if not redis.running:
        redis.start()
    client = make_client(store_url=redis.url, ATTEST_STORE_TIMEOUT_SECONDS="0.2")
    payload = {"signature": test_pki.signature(nonce="while-redis-is-down")}
    redis.stop()
    try:
        assert error_of(client.post("/v1/verify", json=payload), 503) == "store_unavailable"
        assert error_of(client.post("/v1/challenges"), 503) == "store_unavailable"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    finally:
        redis.start()
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/verify", json=payload).status_code == 200


# --- protocol details ------------------------------------------------------------------------------


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    assert error_of(client.get("/nope"), 404) == "not_found"
    response = client.get("/v1/verify")
    assert error_of(response, 405) == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_error_bodies_carry_no_traceback(client: FlaskClient) -> None:
    response = client.post("/v1/verify", data=b"\xff\xfe", content_type="application/json")
    assert "Traceback" not in response.get_data(as_text=True)
    assert json.loads(response.get_data())["error"]["code"] == "malformed_request"


@pytest.mark.slow
def test_pinned_directory_changes_apply_without_restart(make_client: AppFactory, test_pki: GeneratedPki,
                                                        tmp_path) -> None:
    pinned = tmp_path / "pinned"
    pki.write_pinned_dir(pinned, "public", root=test_pki.root.certificate, intermediates=[])
    client = make_client(ATTEST_PINNED_CERTS=str(pinned), ATTEST_TRUST_RELOAD_SECONDS="1")
    payload = {"signature": test_pki.signature(nonce="after-pinning")}
    assert error_of(client.post("/v1/verify", json=payload), 422) == "untrusted_chain"
    pki.write_pinned_dir(pinned, "public", root=test_pki.root.certificate,
                         intermediates=[test_pki.issuing.certificate])
    time.sleep(1.1)  # the reload interval's minimum
    assert client.post("/v1/verify", json=payload).status_code == 200
