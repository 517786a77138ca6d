"""Attestation results as a relying party sees them: verified with PyJWT, a JOSE library independent of the
one that signs (joserfc), against the published JWK Set."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from attest_service import Attestor, CallerPolicy, NonceReplayed, ResultSigner, StoreUnavailable, Verifier, open_store
from attest_service.attestation import Attested
from attest_service.callers.policy import ANONYMOUS, Plan
from attest_service.nonces import NonceStore
from attest_service.results import (
    EAR_PROFILE,
    DocumentJSON,
    load_keys,
    result_claims,
    result_payload,
    write_new_key,
)
from attest_service.results.claims import policy_id
from attest_service.verify import VerifiedDocument
from attest_service.verify.claims import parse_claims, thaw
from attest_service.web.errors import json_bytes
from tests.results.conftest import write_key
from tests.support.redis_server import free_port
from tests.verify.conftest import case_input, case_instant, load_index

OK = load_index()["ok-rsa"]
AT = case_instant(OK)
RESPONSE = json.loads(case_input(OK))
ISSUER = "https://attest.example.com"
CLAIMS = {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "eat_profile", "eat_nonce", "ear.verifier-id", "submods",
          "azure"}


class Counted:
    """An observer of the attestor: what it reported, as the service's metrics see it."""

    def __init__(self) -> None:
        self.results: list[str] = []

    def store_error(self, operation: str) -> None:
        pass

    def nonce_accepted(self, *, challenge: bool) -> None:
        pass

    def challenge_issued(self) -> None:
        pass

    def result_issued(self, kid: str) -> None:
        self.results.append(kid)


def decode(token: str, signer: ResultSigner, *, audience: str, now_checks: bool = True) -> dict[str, object]:
    """PyJWT's verification of ``token`` against ``signer``'s published JWK Set, as a relying party does it."""
    header = jwt.get_unverified_header(token)
    keys = {jwk["kid"]: jwk for jwk in signer.jwks()["keys"]}  # type: ignore[union-attr]
    key = jwt.PyJWK(keys[header["kid"]])
    options = {} if now_checks else {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
    return jwt.decode(token, key=key, algorithms=[key.algorithm_name], audience=audience, issuer=ISSUER,
                      options=options)  # type: ignore[arg-type]


def test_an_accepted_document_gets_a_token_with_exactly_the_contracts_claims(
        verifier: Verifier, store: NonceStore, key_dir: Path) -> None:
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER)
    events = Counted()
    attestor = Attestor(verifier, store, results=signer, events=events)
    caller = CallerPolicy(client_id="license-server", clouds=frozenset({"public"}))
    attested = attestor.attest(RESPONSE, caller=caller, at=AT)
    assert attested.token is not None
    assert attested.to_dict()["token"] == attested.token
    header = jwt.get_unverified_header(attested.token)
    assert header == {"alg": "ES256", "kid": signer.signing_kid, "typ": "JWT"}
    claims = decode(attested.token, signer, audience="license-server", now_checks=False)
    assert set(claims) == CLAIMS
    verdict = attested.document.to_dict()
    assert claims["sub"] == verdict["claims"]["vmId"]  # type: ignore[index]
    assert claims["eat_nonce"] == verdict["claims"]["nonce"]  # type: ignore[index]
    assert claims["iat"] == claims["nbf"] == int(AT.timestamp())
    assert claims["exp"] == claims["iat"] + 600
    assert claims["eat_profile"] == EAR_PROFILE
    assert claims["ear.verifier-id"] == {"developer": "attest-service", "build": f"attest-service "
                                                                                 f"{__import__('attest_service').__version__}"}
    submod = claims["submods"]["azure-imds"]  # type: ignore[index]
    assert submod["ear.status"] == "affirming"
    assert submod["ear.trustworthiness-vector"] == {"instance-identity": 2}
    assert submod["ear.appraisal-policy-id"].startswith("clients/license-server@sha256:")
    assert claims["azure"] == {"cloud": "public", "claims": verdict["claims"], "signer": verdict["signer"]}
    assert events.results == [signer.signing_kid]


def test_each_result_has_its_own_jti_and_a_keyless_caller_is_the_anonymous_audience(
        verifier: Verifier, tmp_path: Path, key_dir: Path) -> None:
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER)
    ids = set()
    for index in range(2):
        store = open_store(f"sqlite:///{tmp_path / f'n{index}.sqlite3'}")
        attested = Attestor(verifier, store, results=signer).attest(
            RESPONSE, caller=CallerPolicy(client_id=ANONYMOUS), at=AT)
        store.close()
        assert attested.token is not None
        claims = decode(attested.token, signer, audience="anonymous", now_checks=False)
        assert claims["submods"]["azure-imds"]["ear.appraisal-policy-id"].startswith("anonymous@")  # type: ignore[index]
        ids.add(claims["jti"])
    assert len(ids) == 2


def test_without_a_signer_there_is_no_token(verifier: Verifier, store: NonceStore) -> None:
    attested = Attestor(verifier, store).attest(RESPONSE, at=AT)
    assert attested.token is None
    assert "token" not in attested.to_dict()


@pytest.mark.slow
def test_a_replay_or_an_unreachable_store_yields_no_token(verifier: Verifier, store: NonceStore,
                                                          key_dir: Path) -> None:
    events = Counted()
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER)
    Attestor(verifier, store, results=signer, events=events).attest(RESPONSE, at=AT)
    with pytest.raises(NonceReplayed):
        Attestor(verifier, store, results=signer, events=events).attest(RESPONSE, at=AT)
    unreachable = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.2)
    with pytest.raises(StoreUnavailable):
        Attestor(verifier, unreachable, results=signer, events=events).attest(RESPONSE, at=AT)
    assert len(events.results) == 1  # the first acceptance only


@pytest.mark.parametrize(("private", "alg"), [
    (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
], ids=["RS256", "EdDSA"])
def test_the_algorithm_is_the_keys(verifier: Verifier, store: NonceStore, tmp_path: Path, private: object,
                                   alg: str) -> None:
    write_key(tmp_path / "k", "k.pem", private)
    signer = ResultSigner.from_directory(tmp_path / "k", issuer=ISSUER)
    token = Attestor(verifier, store, results=signer).attest(RESPONSE, at=AT).token
    assert token is not None
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert decode(token, signer, audience="default", now_checks=False)["aud"] == "default"


def _fresh_token(signer: ResultSigner, verifier: Verifier, *, issued: datetime) -> str:
    document = verifier.verify_response(RESPONSE, at=AT)
    return signer.sign(document, caller=CallerPolicy(client_id="app"), at=issued).token


def test_a_current_token_verifies_and_a_tampered_foreign_or_expired_one_does_not(
        verifier: Verifier, key_dir: Path, tmp_path: Path) -> None:
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER, ttl=timedelta(seconds=600))
    now = datetime.now(UTC)
    token = _fresh_token(signer, verifier, issued=now)
    assert decode(token, signer, audience="app")["sub"]

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["aud"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        decode(f"{header}.{forged}.{signature}", signer, audience="someone-else")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(jwt.InvalidSignatureError):
        decode(f"{header}.{payload}.{flipped}", signer, audience="app")

    # Another key with the same kid claimed: the signature does not verify under the published key.
    write_key(tmp_path / "other", "k.pem", ec.generate_private_key(ec.SECP256R1()))
    other = ResultSigner.from_directory(tmp_path / "other", issuer=ISSUER)
    foreign = _fresh_token(other, verifier, issued=now)
    _, foreign_payload, foreign_signature = foreign.split(".")
    with pytest.raises(jwt.InvalidSignatureError):
        decode(f"{header}.{foreign_payload}.{foreign_signature}", signer, audience="app")
    with pytest.raises(KeyError):  # its own kid is not in the published set at all
        decode(foreign, signer, audience="app")

    expired = _fresh_token(signer, verifier, issued=now - timedelta(seconds=601))
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(expired, signer, audience="app")
    future = _fresh_token(signer, verifier, issued=now + timedelta(seconds=300))
    with pytest.raises(jwt.ImmatureSignatureError):
        decode(future, signer, audience="app")
    with pytest.raises(jwt.InvalidAudienceError):
        decode(token, signer, audience="billing")


def test_the_signing_key_appears_in_no_repr_jwks_discovery_or_error(key_dir: Path, tmp_path: Path) -> None:
    pem = (key_dir / "a.pem").read_text()
    private = load_keys(key_dir).signing.jose_key.as_dict(private=True)
    secret_d = str(private["d"])
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER)
    shown = " ".join([repr(signer), repr(signer.keys), repr(signer.keys.signing), json.dumps(signer.jwks()),
                      json.dumps(signer.discovery())])
    assert secret_d not in shown
    assert "PRIVATE KEY" not in shown
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "k.pem").write_text(pem[: len(pem) // 2] + pem[len(pem) // 2:].replace("A", "!"))
    (broken / "k.pem").chmod(0o600)
    with pytest.raises(Exception) as caught:
        ResultSigner.from_directory(broken, issuer=ISSUER)
    assert secret_d not in str(caught.value)
    assert "PRIVATE" not in str(caught.value)


def test_the_discovery_document_names_the_issuer_and_its_keys(key_dir: Path) -> None:
    write_key(key_dir, "b.pem", ed25519.Ed25519PrivateKey.generate())
    discovery = ResultSigner.from_directory(key_dir, issuer=ISSUER + "/").discovery()
    assert discovery["issuer"] == ISSUER + "/"
    assert discovery["jwks_uri"] == ISSUER + "/.well-known/jwks.json"
    assert discovery["id_token_signing_alg_values_supported"] == ["ES256", "EdDSA"]
    assert set(discovery["claims_supported"]) == CLAIMS  # type: ignore[arg-type]


@pytest.mark.parametrize("issuer", ["attest.example.com", "ftp://x", "https://x/?q=1", "https://u@x", "https://x#f"])
def test_an_issuer_that_is_not_a_plain_http_url_is_refused(key_dir: Path, issuer: str) -> None:
    with pytest.raises(Exception, match="ATTEST_RESULT_ISSUER"):
        ResultSigner.from_directory(key_dir, issuer=issuer)


class Ticks:
    """A monotonic clock the test moves by hand (the reload interval is read from it)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_keys_are_reloaded_after_the_interval_and_a_broken_directory_keeps_the_last_good(key_dir: Path) -> None:
    ticks = Ticks()
    signer = ResultSigner(key_dir, issuer=ISSUER, reload_seconds=5, clock=ticks)
    first = signer.signing_kid
    write_key(key_dir, "b.pem", ec.generate_private_key(ec.SECP256R1()))
    assert signer.keys.signing.kid == first  # not before the interval
    ticks.now += 5
    second = signer.keys.signing.kid
    assert second != first
    assert len(signer.jwks()["keys"]) == 2
    (key_dir / "c.pem").write_text("not a key")
    (key_dir / "c.pem").chmod(0o600)
    ticks.now += 5
    assert signer.keys.signing.kid == second
    assert signer.failing
    (key_dir / "c.pem").unlink()
    (key_dir / "a.pem").unlink()
    ticks.now += 5
    published = [jwk["kid"] for jwk in signer.jwks()["keys"]]  # type: ignore[index, union-attr]
    assert published == [second]
    assert not signer.failing
    write_key(key_dir, "c.pem", ec.generate_private_key(ec.SECP256R1()))
    signer.request_reload()  # SIGHUP: no waiting for the interval
    assert signer.keys.signing.name == "c.pem"


def test_a_signer_whose_directory_is_broken_at_start_uses_the_last_good_keys(key_dir: Path, tmp_path: Path) -> None:
    good = load_keys(key_dir)
    signer = ResultSigner(tmp_path / "missing", issuer=ISSUER, last_good=good)
    assert signer.failing
    assert signer.signing_kid == good.signing.kid
    with pytest.raises(Exception, match="ATTEST_RESULT_KEYS"):
        ResultSigner(tmp_path / "missing", issuer=ISSUER)


def test_the_emergency_withdrawal_of_a_compromised_key_takes_effect_within_the_reload_interval(
        verifier: Verifier, key_dir: Path) -> None:
    ticks = Ticks()
    signer = ResultSigner(key_dir, issuer=ISSUER, reload_seconds=5, clock=ticks)
    compromised = signer.signing_kid
    # The runbook's procedure: a new key (keys new names it to sort last, so it signs), then the removal.
    replacement = write_new_key(key_dir).kid
    (key_dir / "a.pem").unlink()
    ticks.now += 5
    token = _fresh_token(signer, verifier, issued=datetime.now(UTC))
    assert jwt.get_unverified_header(token)["kid"] == replacement
    assert [jwk["kid"] for jwk in signer.jwks()["keys"]] == [replacement]  # type: ignore[index, union-attr]
    assert decode(token, signer, audience="app")["eat_nonce"]
    assert compromised != replacement
    assert not signer.failing


def test_an_emptied_key_directory_keeps_the_last_good_keys_and_says_so_at_every_look(
        key_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ticks = Ticks()
    failures: list[bool] = []

    class Events:
        def keys_reloaded(self, *, ok: bool) -> None:
            failures.append(ok)

    signer = ResultSigner(key_dir, issuer=ISSUER, reload_seconds=5, clock=ticks, events=Events())
    kid = signer.signing_kid
    (key_dir / "a.pem").unlink()
    with caplog.at_level("ERROR", logger="attest_service.results.signer"):
        for _ in range(3):
            ticks.now += 5
            # Kept: an empty directory is as likely an unmounted volume or a mistake as a withdrawal.
            assert signer.keys.signing.kid == kid
    assert signer.failing
    loud = [record for record in caplog.records if "has no usable key" in record.getMessage()]
    assert len(loud) == 3, caplog.text
    assert {record.levelname for record in loud} == {"ERROR"}
    assert kid in loud[0].getMessage()
    assert "keys new" in loud[0].getMessage()
    assert failures == [False]  # one failed reload counted: the directory did not change again
    caplog.clear()
    key_dir.rmdir()  # no directory at all: the same, at every look
    with caplog.at_level("ERROR", logger="attest_service.results.signer"):
        for _ in range(2):
            ticks.now += 5
            assert signer.keys.signing.kid == kid
    assert len([r for r in caplog.records if "has no usable key" in r.getMessage()]) == 2, caplog.text
    key_dir.mkdir(mode=0o700)
    new = write_new_key(key_dir).kid
    caplog.clear()
    with caplog.at_level("ERROR", logger="attest_service.results.signer"):
        ticks.now += 5
        assert signer.keys.signing.kid == new
    assert not signer.failing
    assert not caplog.records


def _with_content(document: VerifiedDocument, **changes: object) -> VerifiedDocument:
    """``document`` with its signed content changed (for the encoding only; nothing is verified again)."""
    fields = dict(thaw(document.claims.fields))  # type: ignore[arg-type]
    fields.update(changes)
    return dataclasses.replace(document, claims=parse_claims(json.dumps(fields).encode()))


@pytest.mark.parametrize("caller", [
    CallerPolicy(client_id="license-server", clouds=frozenset({"public"}), skus=frozenset({"2022-datacenter"}),
                 plans=frozenset({Plan(name="p", product="q", publisher="r")})),
    CallerPolicy(client_id=ANONYMOUS),
    CallerPolicy(client_id="d\u00e9p\u00f4t-\"q\"\\\u2028"),
], ids=["lists", "anonymous", "escaped-id"])
def test_the_signed_payload_is_the_claim_set_encoded_as_the_api_encodes(verifier: Verifier,
                                                                       caller: CallerPolicy) -> None:
    # The payload is assembled from parts encoded separately (the document's once per request, the caller's once
    # per caller): it must be exactly the claim set, every string escaped as the one encoder escapes it.
    plain = verifier.verify_response(RESPONSE, at=AT)
    odd = _with_content(plain, vmId="vm-\u00e9\u2028\"</script>", nonce="n\u00f6nce\\\"", sku="\u6f22\ud83d\ude00")
    for document in (plain, odd):
        arguments = {"caller": caller, "issuer": ISSUER, "at": AT, "verifier_build": "attest-service 9", "jti": "j-1"}
        payload = result_payload(document, ttl_seconds=600, **arguments)  # type: ignore[arg-type]
        claims = result_claims(document, ttl=timedelta(seconds=600), **arguments)  # type: ignore[arg-type]
        assert json.loads(payload) == claims
        assert payload.isascii()
        shared = DocumentJSON.of(document)
        assert result_payload(document, ttl_seconds=600, shared=shared, **arguments) == payload  # type: ignore[arg-type]


def test_the_answer_is_the_bytes_of_its_dict_with_and_without_a_token(verifier: Verifier, store: NonceStore,
                                                                      key_dir: Path) -> None:
    # The verify answer is assembled from the document's claims and signer encoded once and the token as it is:
    # it must be byte for byte what encoding the answer's dict gives.
    signer = ResultSigner.from_directory(key_dir, issuer=ISSUER)
    document = _with_content(verifier.verify_response(RESPONSE, at=AT), vmId="vm-\u00e9\u2028\"", sku="\u6f22")
    token = signer.sign(document, caller=CallerPolicy(client_id="app"), at=AT).token
    for attested in (Attested(document=document, nonce_checked=True, challenge=False, token=token),
                     Attested(document=document, nonce_checked=False, challenge=True),
                     Attested(document=document, nonce_checked=False, challenge=False, token=token,
                              shared=DocumentJSON.of(document)),
                     Attested(document=document, nonce_checked=True, challenge=True, shared=DocumentJSON.of(document))):
        assert attested.to_json() == json_bytes(attested.to_dict())
    attested = Attestor(verifier, store, results=signer).attest(RESPONSE, at=AT)
    body = json.loads(attested.to_json())
    assert body == attested.to_dict()
    assert decode(body["token"], signer, audience="default", now_checks=False)["azure"] == {
        "cloud": body["cloud"], "claims": body["claims"], "signer": body["signer"]}


def test_different_plan_allow_lists_have_different_policy_ids() -> None:
    # A relying party tells policies apart by the id: a "/" inside a plan's field must not make two allow-lists
    # that admit different plans one id ("p/x" + "q" and "p" + "x/q" read alike as publisher/product/name).
    first = CallerPolicy(client_id="c", plans=frozenset({Plan(publisher="p/x", product="q", name="n")}))
    second = CallerPolicy(client_id="c", plans=frozenset({Plan(publisher="p", product="x/q", name="n")}))
    assert policy_id(first) != policy_id(second)
    assert policy_id(first) == policy_id(CallerPolicy(client_id="c", plans=frozenset({
        Plan(publisher="p/x", product="q", name="n")})))
