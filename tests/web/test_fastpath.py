"""The direct WSGI path of ``POST /v1/verify`` answers exactly as the Flask view does, and takes only plain requests.

Each scenario runs the same requests through two applications built alike: one answered by the direct path
(``app.wsgi_app``), one by the Flask application behind it (``app.wsgi_app.flask_app``). Status, headers,
bodies and the metrics they record must be the same.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request_started
from prometheus_client import REGISTRY
from werkzeug.test import EnvironBuilder, run_wsgi_app

from attest_service.callers.reloading import ReloadingPolicy
from attest_service.errors import AttestError
from attest_service.server import master
from attest_service.web import app as app_module
from attest_service.web import create_app
from attest_service.web.body import MAX_BODY_BYTES, announced_length
from attest_service.web.fastpath import VerifyFastPath
from tests.web.conftest import API_KEYS_ENV, KEYS, Clock, GeneratedPki, settings_for

#: The request id the tests offer; a generated one is 32 hex digits.
OFFERED_ID = "req-0001"


@dataclass(frozen=True)
class Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


def call(app: Callable[..., Any], body: bytes | None, headers: dict[str, str] | None = None, *,
         method: str = "POST", path: str = "/v1/verify", environ: dict[str, object] | None = None) -> Answer:
    # The peer is always known under a WSGI server (gunicorn sets REMOTE_ADDR and REMOTE_PORT).
    builder = EnvironBuilder(path=path, method=method, data=body, headers=headers or {},
                             content_type="application/json", environ_overrides=environ or {},
                             environ_base={"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000"})
    try:
        iterable, status, response_headers = run_wsgi_app(app, builder.get_environ())
        return Answer(status, list(response_headers.items()), b"".join(iterable))
    finally:
        builder.close()


def verification_samples() -> dict[tuple[str, ...], float]:
    """The verification and HTTP counters of ``/v1/verify`` now, by labels."""
    samples: dict[tuple[str, ...], float] = {}
    for family in REGISTRY.collect():
        if family.name not in ("attest_verifications", "attest_http_requests"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("route", "/v1/verify") == "/v1/verify":
                samples[(sample.name, *sorted(sample.labels.values()))] = sample.value
    return samples


@dataclass
class Pair:
    """Two applications built alike: ``direct`` answered by the direct path, ``flask`` by Flask alone."""

    direct: VerifyFastPath
    flask: Callable[..., Any]
    apps: tuple[Flask, Flask]

    def both(self, body: bytes | None, headers: dict[str, str] | None = None) -> tuple[Answer, Answer]:
        before = verification_samples()
        direct = call(self.direct, body, headers)
        between = verification_samples()
        flask = call(self.flask, body, headers)
        after = verification_samples()
        recorded_direct = {key: value - before.get(key, 0) for key, value in between.items()}
        recorded_flask = {key: value - between.get(key, 0) for key, value in after.items()}
        assert {k: v for k, v in recorded_direct.items() if v} == {k: v for k, v in recorded_flask.items() if v}
        assert any(recorded_direct.values()), "nothing was counted"
        return direct, flask


@pytest.fixture
def make_pair(test_pki: GeneratedPki, tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    apps: list[Flask] = []

    def factory(store: str = "sqlite", **env: str) -> Pair:
        """``store``: "sqlite" (one database each), "shared" (one for both) or a store URL for both."""
        built = []
        shared = f"sqlite:///{tmp_path / f'shared-{len(apps)}.sqlite3'}"
        for side in ("direct", "flask"):
            if store == "sqlite":
                url = f"sqlite:///{tmp_path / f'{side}-{len(apps)}.sqlite3'}"
            elif store == "shared":
                url = shared
            else:
                url = store
            app = create_app(settings_for(test_pki, url, **env), clock=Clock())
            apps.append(app)
            built.append(app)
        direct = built[0].wsgi_app
        assert isinstance(direct, VerifyFastPath)
        flask_side = built[1].wsgi_app
        assert isinstance(flask_side, VerifyFastPath)
        return Pair(direct=direct, flask=flask_side.flask_app, apps=(built[0], built[1]))

    yield factory
    for app in apps:
        app.extensions["attest_service"].store.close()


#: Claims of an attestation result that differ from one result to the next, whichever path issued it.
PER_RESULT_CLAIMS = frozenset({"jti", "iat", "nbf", "exp"})


def _without_token(body: bytes) -> tuple[bytes, dict[str, object] | None]:
    """The body with its attestation result taken out, and the result's claims but those unique to it."""
    if not body.startswith(b'{"verified":true'):
        return body, None
    answer = json.loads(body)
    token = answer.pop("token", None)
    if token is None:
        return body, None
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return json.dumps(answer).encode(), {key: value for key, value in claims.items() if key not in PER_RESULT_CLAIMS}


def assert_same(direct: Answer, flask: Answer, *, status: str) -> None:
    assert direct.status == flask.status == status, (direct, flask)
    # Each accepted document gets a result of its own (its id and instants); everything else is the same.
    assert _without_token(direct.body) == _without_token(flask.body)
    assert [(name, value) for name, value in direct.headers if name != "Content-Length"] == \
        [(name, value) for name, value in flask.headers if name != "Content-Length"]
    assert dict(direct.headers)["X-Request-Id"] == OFFERED_ID


def body_of(**fields: object) -> bytes:
    return json.dumps(fields).encode()


KEYED = {"ATTEST_API_KEYS": API_KEYS_ENV}
AUTH = {"Authorization": f"Bearer {KEYS['license-server']}", "X-Request-Id": OFFERED_ID}


def test_a_verification_then_its_replay(make_pair: Callable[..., Pair], test_pki: GeneratedPki) -> None:
    pair = make_pair(**KEYED)
    body = body_of(document=test_pki.document(nonce="nonce-0001"), nonce="nonce-0001")
    assert_same(*pair.both(body, AUTH), status="200 OK")
    assert_same(*pair.both(body, AUTH), status="409 CONFLICT")


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'{"document": 1}', b'{"unknown": 1, "signature": "x"}', b'{"signature": "***"}',
    b'{"signature": "' + base64.b64encode(b"\x30\x03\x02\x01\x01") + b'"}', b"\xff\xfe", b"",
    b'{"signature": "a", "signature": "b"}', b"[" * 10_000,
])
def test_refused_bodies(make_pair: Callable[..., Pair], body: bytes) -> None:
    direct, flask = make_pair(**KEYED).both(body, AUTH)
    assert_same(direct, flask, status=direct.status)
    assert direct.status[:3] in ("400", "422")


def test_document_refusals(make_pair: Callable[..., Pair], test_pki: GeneratedPki) -> None:
    pair = make_pair(**KEYED)
    mismatch = body_of(document=test_pki.document(nonce="nonce-0002"), nonce="another")
    assert_same(*pair.both(mismatch, AUTH), status="422 UNPROCESSABLE ENTITY")
    der = bytearray(base64.b64decode(test_pki.signature(nonce="nonce-0003")))
    der[-10] ^= 1  # inside the signature value
    forged = body_of(signature=base64.b64encode(bytes(der)).decode())
    direct, flask = pair.both(forged, AUTH)
    assert_same(direct, flask, status=direct.status)
    assert json.loads(direct.body)["error"]["code"] == "signature_invalid"


@pytest.mark.parametrize("headers", [
    {"X-Request-Id": OFFERED_ID},
    {"Authorization": "Bearer wrong", "X-Request-Id": OFFERED_ID},
    {"Authorization": "Basic abc", "X-Request-Id": OFFERED_ID},
])
def test_unauthorized(make_pair: Callable[..., Pair], headers: dict[str, str]) -> None:
    direct, flask = make_pair(**KEYED).both(b"{}", headers)
    assert_same(direct, flask, status="401 UNAUTHORIZED")
    assert dict(direct.headers)["WWW-Authenticate"] == 'Bearer realm="attest-service"'


def test_rate_limited(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(ATTEST_RATE_LIMIT_PER_MINUTE="1", **KEYED)
    assert_same(*pair.both(b"{}", AUTH), status="400 BAD REQUEST")
    direct, flask = pair.both(b"{}", AUTH)
    assert_same(direct, flask, status="429 TOO MANY REQUESTS")
    assert "Retry-After" in dict(direct.headers)


def test_the_replay_of_a_document_accepted_here_is_refused_by_flask(make_pair: Callable[..., Pair],
                                                                   test_pki: GeneratedPki) -> None:
    pair = make_pair("shared", **KEYED)
    body = body_of(document=test_pki.document(nonce="nonce-0007"), nonce="nonce-0007")
    assert call(pair.direct, body, AUTH).status == "200 OK"
    assert call(pair.flask, body, AUTH).status == "409 CONFLICT"
    assert call(pair.direct, body, AUTH).status == "409 CONFLICT"


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
def test_open_access_on_loopback_asks_a_proxied_caller_for_a_challenge(
        make_pair: Callable[..., Pair], test_pki: GeneratedPki, monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    # As under gunicorn listening on loopback only: anonymous callers may bring their own nonces.
    monkeypatch.setattr(app_module, "_access_policy", lambda settings, snapshot: ReloadingPolicy(
        lambda: master.access_policy(settings, loopback=True), None, interval_seconds=10))
    pair = make_pair()
    direct_only = body_of(document=test_pki.document(nonce="nonce-0008"), nonce="nonce-0008")
    assert call(pair.direct, direct_only, {"X-Request-Id": OFFERED_ID}).status == "200 OK"
    body = body_of(document=test_pki.document(nonce="nonce-0009"), nonce="nonce-0009")
    direct, flask = pair.both(body, {"X-Request-Id": OFFERED_ID, header: "for=203.0.113.9"})
    assert_same(direct, flask, status="422 UNPROCESSABLE ENTITY")
    assert json.loads(direct.body)["error"]["code"] == "nonce_unknown"


def test_anonymous_callers_behind_a_trusted_proxy_are_limited_per_client(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(ATTEST_ALLOW_OPEN="1", ATTEST_TRUSTED_PROXIES="127.0.0.1", ATTEST_RATE_LIMIT_PER_MINUTE="1")
    first, second = ({"X-Request-Id": OFFERED_ID, "X-Forwarded-For": client} for client in ("203.0.113.1",
                                                                                          "203.0.113.2"))
    assert_same(*pair.both(b"{}", first), status="400 BAD REQUEST")
    assert_same(*pair.both(b"{}", second), status="400 BAD REQUEST")
    # Repeated headers arrive joined by the server: the client is the last address no trusted proxy wrote.
    joined = {"X-Request-Id": OFFERED_ID, "X-Forwarded-For": "6.6.6.6, 203.0.113.1,127.0.0.1"}
    assert_same(*pair.both(b"{}", joined), status="429 TOO MANY REQUESTS")
    # Without the proxy's header the peer itself is the source, with a budget of its own.
    assert_same(*pair.both(b"{}", {"X-Request-Id": OFFERED_ID}), status="400 BAD REQUEST")


def test_an_interruption_is_not_answered(make_pair: Callable[..., Pair], test_pki: GeneratedPki,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(**KEYED)

    class Interrupted(BaseException):
        pass

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted

    monkeypatch.setattr(pair.apps[0].extensions["attest_service"].attestor, "attest_der", interrupted)
    body = body_of(document=test_pki.document(nonce="nonce-0010"), nonce="nonce-0010")
    with pytest.raises(Interrupted):
        call(pair.direct, body, AUTH)


def test_store_unavailable(make_pair: Callable[..., Pair], test_pki: GeneratedPki) -> None:
    pair = make_pair("redis://127.0.0.1:1/0", ATTEST_STORE_TIMEOUT_SECONDS="0.2", **KEYED)
    body = body_of(document=test_pki.document(nonce="nonce-0005"), nonce="nonce-0005")
    assert_same(*pair.both(body, AUTH), status="503 SERVICE UNAVAILABLE")


def test_a_bug_is_answered_500_without_detail(make_pair: Callable[..., Pair], test_pki: GeneratedPki,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(**KEYED)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug with a secret in its message")

    for app in pair.apps:
        monkeypatch.setattr(app.extensions["attest_service"].attestor, "attest_der", broken)
    body = body_of(document=test_pki.document(nonce="nonce-0006"), nonce="nonce-0006")
    direct, flask = pair.both(body, AUTH)
    assert_same(direct, flask, status="500 INTERNAL SERVER ERROR")
    assert b"secret" not in direct.body


def test_a_request_id_is_generated_when_none_or_a_bad_one_is_offered(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(**KEYED)
    for offered in ({}, {"X-Request-Id": "bad id \"forged\""}):
        headers = {"Authorization": AUTH["Authorization"], **offered}
        direct, flask = pair.both(b"{}", headers)
        assert direct.status == flask.status == "400 BAD REQUEST"
        assert direct.body == flask.body
        ids = [dict(answer.headers)["X-Request-Id"] for answer in (direct, flask)]
        assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
        assert ids[0] != ids[1]


# --- which requests the direct path takes -----------------------------------------------------------


@pytest.fixture
def counted_flask_requests() -> Iterator[list[object]]:
    seen: list[object] = []

    def count(sender: object, **extra: object) -> None:
        seen.append(sender)

    request_started.connect(count)
    yield seen
    request_started.disconnect(count)


def test_a_plain_verify_request_does_not_reach_flask(make_pair: Callable[..., Pair],
                                                     counted_flask_requests: list[object]) -> None:
    pair = make_pair(**KEYED)
    assert call(pair.direct, b"{}", AUTH).status == "400 BAD REQUEST"
    assert counted_flask_requests == []
    assert call(pair.flask, b"{}", AUTH).status == "400 BAD REQUEST"
    assert len(counted_flask_requests) == 1


@pytest.mark.parametrize(("method", "path", "environ", "status"), [
    ("GET", "/v1/verify", {}, "405 METHOD NOT ALLOWED"),
    ("PUT", "/v1/verify", {}, "405 METHOD NOT ALLOWED"),
    ("POST", "/v1/verify/", {}, "404 NOT FOUND"),
    ("POST", "/v1/verify", {"CONTENT_LENGTH": ""}, "400 BAD REQUEST"),
    ("POST", "/v1/verify", {"CONTENT_LENGTH": str(MAX_BODY_BYTES + 1)}, "413 REQUEST ENTITY TOO LARGE"),
    ("POST", "/v1/verify", {"CONTENT_LENGTH": "1" + "0" * 30}, "413 REQUEST ENTITY TOO LARGE"),
    ("POST", "/v1/verify", {"HTTP_TRANSFER_ENCODING": "chunked"}, "400 BAD REQUEST"),
    ("HEAD", "/v1/verify", {}, "405 METHOD NOT ALLOWED"),
    ("post", "/v1/verify", {}, "400 BAD REQUEST"),
    ("POST", "/v1/verify", {"PATH_INFO": "//v1/verify"}, "400 BAD REQUEST"),
    ("POST", "/healthz", {}, "405 METHOD NOT ALLOWED"),
])
def test_every_other_request_is_flasks(make_pair: Callable[..., Pair], counted_flask_requests: list[object],
                                       method: str, path: str, environ: dict[str, object], status: str) -> None:
    pair = make_pair(**KEYED)
    answer = call(pair.direct, b"{}", AUTH, method=method, path=path, environ=environ)
    assert answer.status == status
    assert len(counted_flask_requests) == 1
    assert dict(answer.headers).get("Connection") == ("close" if status.startswith("413") else None)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("12", 12), (str(MAX_BODY_BYTES), MAX_BODY_BYTES), ("007", 7), (None, None), ("", None),
    ("-1", "malformed_request"), ("+1", "malformed_request"), (" 1", "malformed_request"),
    ("1 ", "malformed_request"), ("1.0", "malformed_request"), ("١٢", "malformed_request"),
    ("²", "malformed_request"), (str(MAX_BODY_BYTES + 1), "request_too_large"), ("9" * 100, "request_too_large"),
])
def test_announced_length(text: str | None, expected: int | str | None) -> None:
    # The one reading of Content-Length, for the direct path's choice, Flask's early 413 and the body gate.
    environ = {} if text is None else {"CONTENT_LENGTH": text}
    if isinstance(expected, str):
        with pytest.raises(AttestError) as refused:
            announced_length(environ)  # type: ignore[arg-type]
        assert refused.value.code == expected
    else:
        assert announced_length(environ) == expected  # type: ignore[arg-type]


def test_a_body_shorter_than_announced_is_malformed(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair(**KEYED)
    for side in (pair.direct, pair.flask):
        answer = call(side, b"{}", AUTH, environ={"CONTENT_LENGTH": "10"})
        assert answer.status == "400 BAD REQUEST"
        assert json.loads(answer.body)["error"]["code"] == "malformed_request"
