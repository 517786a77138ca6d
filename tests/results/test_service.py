"""The service issuing attestation results: a real ``attest-service serve`` (gunicorn master, two workers).

Checked the way a relying party sees it: PyJWT (independent of the signing library) fetches the JWK Set from
the running service and verifies the token ``/v1/verify`` answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attest_service.results import load_keys
from attest_service.results.keys import GENERATED_KEY_NAME
from tests.results.conftest import write_key
from tests.support import tools
from tests.support.redis_server import RedisServer
from tests.support.service import DocumentFactory, ServiceProcess

pytestmark = pytest.mark.slow

#: Seconds a key change may take to show: the reload interval (1 s here) plus a request's worth.
PICKUP_SECONDS = 15.0


def _service(env: dict[str, str], workdir: Path) -> ServiceProcess:
    service = ServiceProcess(env, workdir)
    # The issuer is where relying parties reach the service: its URL, known once the port is chosen.
    service._env.setdefault("ATTEST_RESULT_ISSUER", service.url)
    return service


def _verify(service: ServiceProcess, factory: DocumentFactory, nonce: str) -> dict[str, object]:
    reply = service.post("/v1/verify", factory.verify_body(nonce))
    assert reply.status == 200, reply.body
    return reply.body


def _relying_party(service: ServiceProcess, token: str, audience: str = "anonymous") -> dict[str, object]:
    client = jwt.PyJWKClient(service.url + "/.well-known/jwks.json", cache_keys=False, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    return jwt.decode(token, key=key, algorithms=["ES256", "RS256", "EdDSA"], audience=audience,
                      issuer=service.url)


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PICKUP_SECONDS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"not within {PICKUP_SECONDS} s: {what}")


def test_the_embedded_default_generates_one_key_and_issues_verifiable_tokens(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    state = tmp_path / "state"
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{state / 'n.sqlite3'}"}
    with _service(env, tmp_path) as service:
        key_file = state / "result-keys" / GENERATED_KEY_NAME
        assert key_file.stat().st_mode & 0o777 == 0o600
        kid = load_keys(key_file.parent).signing.kid
        body = _verify(service, factory, "result-nonce-1")
        token = str(body["token"])
        claims = _relying_party(service, token)
        assert claims["sub"] == body["claims"]["vmId"]  # type: ignore[index]
        assert claims["eat_nonce"] == "result-nonce-1"
        assert jwt.get_unverified_header(token)["kid"] == kid
        # A replay is refused, and carries no token.
        replay = service.post("/v1/verify", factory.verify_body("result-nonce-1"))
        assert replay.status == 409
        assert "token" not in replay.body
        # Both workers publish the same keys, with a cache lifetime.
        for _ in range(6):
            jwks = service.get("/.well-known/jwks.json")
            assert jwks.status == 200
            assert [key["kid"] for key in jwks.body["keys"]] == [kid]  # type: ignore[union-attr, index]
        discovery = service.get("/.well-known/openid-configuration").body
        assert discovery["issuer"] == service.url
        assert discovery["jwks_uri"] == service.url + "/.well-known/jwks.json"
        metrics = service.request("GET", "/metrics")
        assert metrics.status == 200
    # A restart keeps the key: the same kid signs.
    with _service(env, tmp_path) as service:
        assert sorted(path.name for path in key_file.parent.iterdir()) == [GENERATED_KEY_NAME]
        token = str(_verify(service, factory, "result-nonce-2")["token"])
        assert jwt.get_unverified_header(token)["kid"] == kid
        assert _relying_party(service, token)["eat_nonce"] == "result-nonce-2"


def _signing_kid(service: ServiceProcess, factory: DocumentFactory) -> str:
    return str(jwt.get_unverified_header(str(_verify(service, factory, f"n-{time.monotonic_ns()}")["token"]))["kid"])


def _kids(service: ServiceProcess) -> list[str]:
    return [key["kid"] for key in service.get("/.well-known/jwks.json").body["keys"]]  # type: ignore[union-attr, index]


def test_a_key_rotation_is_picked_up_live_and_a_broken_directory_keeps_the_last_good_keys(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    keys = tmp_path / "keys"
    write_key(keys, "a.pem", ec.generate_private_key(ec.SECP256R1()))
    old = load_keys(keys).signing.kid
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_RESULT_KEYS": str(keys),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.sqlite3'}", "ATTEST_TRUST_RELOAD_SECONDS": "1",
           "ATTEST_RESULT_TTL_SECONDS": "120"}
    with _service(env, tmp_path) as service:
        first = str(_verify(service, factory, "rotate-1")["token"])
        # Step 1: add the new key; it is published (on every worker) before it signs anything.
        write_key(keys, "0-next.pem", ec.generate_private_key(ec.SECP256R1()))
        new = load_keys(keys).keys[0].kid
        _eventually(lambda: all(sorted(_kids(service)) == sorted([old, new]) for _ in range(4)), "both keys published")
        assert jwt.get_unverified_header(str(_verify(service, factory, "rotate-2")["token"]))["kid"] == old
        # Step 2: switch: the new key sorts last.
        (keys / "0-next.pem").rename(keys / "b.pem")
        _eventually(lambda: all(_signing_kid(service, factory) == new for _ in range(6)),
                    "the new key signs, on every worker")
        # A result signed before the switch still verifies: the old key is still published.
        assert _relying_party(service, first)["eat_nonce"] == "rotate-1"
        # A broken key file: the last good keys stay in use, and the log says why, without key material.
        (keys / "c.pem").write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        (keys / "c.pem").chmod(0o600)
        _eventually(lambda: "c.pem is not an unencrypted PEM private key" in service.log_tail(100_000),
                    "the broken key is reported")
        assert sorted(_kids(service)) == sorted([old, new])
        assert jwt.get_unverified_header(str(_verify(service, factory, "rotate-3")["token"]))["kid"] == new
        failing = service.request("GET", "/metrics")
        assert failing.status == 200
        (keys / "c.pem").unlink()
        # Step 3: retire the old key.
        (keys / "a.pem").unlink()
        _eventually(lambda: all(_kids(service) == [new] for _ in range(4)), "the old key is withdrawn")
        log = service.log_tail(1_000_000)
    for key in (keys / "b.pem",):
        body = "".join(key.read_text().splitlines()[1:-1])
        assert body[:40] not in log
    assert "PRIVATE KEY" not in log


def test_metrics_count_results_by_kid(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    keys = tmp_path / "keys"
    write_key(keys, "a.pem", ec.generate_private_key(ec.SECP256R1()))
    kid = load_keys(keys).signing.kid
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_RESULT_KEYS": str(keys),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.sqlite3'}"}
    with _service(env, tmp_path) as service:
        for index in range(3):
            _verify(service, factory, f"count-{index}")
        connection_text = _metrics_text(service)
    assert f'attest_results_issued_total{{kid="{kid}"}} 3.0' in connection_text


def _metrics_text(service: ServiceProcess) -> str:
    try:
        with urllib.request.urlopen(service.url + "/metrics", timeout=10) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as exc:
        pytest.fail(f"/metrics answered {exc.code}:\n{service.log_tail()}")


@tools.requires_redis
def test_with_a_shared_store_and_no_key_directory_results_are_off(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as redis:
        env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": redis.url}
        with _service(env, tmp_path) as service:
            body = _verify(service, factory, "no-results")
            assert "token" not in body
            assert service.get("/.well-known/jwks.json").status == 404
            assert service.get("/.well-known/openid-configuration").status == 404
            log = service.log_tail(100_000)
    assert log.count("attestation results are off") == 1, log


def test_an_unusable_key_directory_stops_the_start(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    keys = tmp_path / "keys"
    write_key(keys, "a.pem", ec.generate_private_key(ec.SECP256R1()), mode=0o644)
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_RESULT_KEYS": str(keys),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.sqlite3'}"}
    service = _service(env, tmp_path)
    with pytest.raises(RuntimeError, match=r"a\.pem has mode 0644"):
        service.start()
    assert json.dumps(service.log_tail()).count("BEGIN") == 0


def _worker_pids(service: ServiceProcess) -> list[int]:
    master = service.pid
    assert master is not None
    text = Path(f"/proc/{master}/task/{master}/children").read_text()
    return sorted(int(pid) for pid in text.split())


def test_a_worker_respawned_while_the_key_directory_is_broken_signs_with_the_masters_last_good_keys(
        tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    keys = tmp_path / "keys"
    write_key(keys, "a.pem", ec.generate_private_key(ec.SECP256R1()))
    kid = load_keys(keys).signing.kid
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_RESULT_KEYS": str(keys),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.sqlite3'}", "ATTEST_TRUST_RELOAD_SECONDS": "1"}
    service = ServiceProcess(env, tmp_path, workers=1)
    service._env["ATTEST_RESULT_ISSUER"] = service.url
    with service:
        (keys / "z.pem").write_text("not a key")
        (keys / "z.pem").chmod(0o600)
        # The master notices on its own timer: a worker started from now on could not load the directory.
        _eventually(lambda: "result key directory" in service.log_tail(100_000), "the master reports the breakage")
        (old,) = _worker_pids(service)
        os.kill(old, signal.SIGKILL)
        _eventually(lambda: bool(_worker_pids(service)) and old not in _worker_pids(service), "a new worker")
        _eventually(lambda: _kids(service) == [kid], "the new worker publishes the master's last good key")
        assert _signing_kid(service, factory) == kid
        assert service.pid is not None  # the master did not halt on a worker that could not boot


def test_a_default_key_that_cannot_be_made_leaves_the_served_results_off(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{blocker / 'n.sqlite3'}"}
    with _service(env, tmp_path) as service:
        for _ in range(4):  # every worker
            assert service.get("/.well-known/jwks.json").status == 404
        assert service.get("/readyz").status == 503
        log = service.log_tail(100_000)
    assert log.count("attestation results are off: ATTEST_RESULT_KEYS: cannot create the default key") == 1, log


def test_the_emergency_withdrawal_of_a_compromised_key_on_a_running_service(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    keys = tmp_path / "keys"
    write_key(keys, GENERATED_KEY_NAME, ec.generate_private_key(ec.SECP256R1()))
    compromised = load_keys(keys).signing.kid
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_RESULT_KEYS": str(keys),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.sqlite3'}", "ATTEST_TRUST_RELOAD_SECONDS": "1"}
    with _service(env, tmp_path) as service:
        assert _signing_kid(service, factory) == compromised
        # docs/OPERATIONS.md's emergency procedure: a new key first (it sorts last: it signs), then the removal.
        made = subprocess.run([sys.executable, "-m", "attest_service", "keys", "new", str(keys)],
                              capture_output=True, text=True, timeout=60, check=True)
        replacement = made.stdout.strip()
        (keys / GENERATED_KEY_NAME).unlink()
        _eventually(lambda: all(_kids(service) == [replacement] for _ in range(4)),
                    "the compromised key is withdrawn from the JWK Set, on every worker")
        _eventually(lambda: all(_signing_kid(service, factory) == replacement for _ in range(6)),
                    "the new key signs, on every worker")
        token = str(_verify(service, factory, "after-withdrawal")["token"])
        assert _relying_party(service, token)["eat_nonce"] == "after-withdrawal"
        # Emptying the directory instead withdraws nothing: the last good keys stay, and the log says so loudly.
        for path in keys.iterdir():
            path.unlink()
        # A worker looks when it serves a result or the JWK Set and the interval has passed.
        _eventually(lambda: _kids(service) == [replacement] and service.log_tail(1_000_000).count(
            "has no usable key") >= 4, "an error at every look at the emptied directory")
        assert _signing_kid(service, factory) == replacement
