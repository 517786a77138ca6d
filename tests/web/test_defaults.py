"""Who may call with no keys and no policy file: challenges only, unless the service listens on loopback only.

Accepting keyless callers' own nonces lets anyone submit a captured document first. The image and the chart
bind 0.0.0.0, so only the loopback bind of ``make run`` (and of the contract's acceptance tests) keeps the
open mode, with a warning; ``ATTEST_ALLOW_OPEN=1`` opens a service elsewhere, and only without keys and
without a policy file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attest_service.errors import ConfigurationError
from attest_service.server import master
from attest_service.settings import Settings
from attest_service.web import create_app
from tests.web.conftest import API_KEYS_ENV, Clock, GeneratedPki, settings_for
from tests.web.live import LiveService, live_service

OPEN_WARNING = "callers need no key and may use their own nonces"


def _fresh(live_pki: GeneratedPki, nonce: str) -> dict[str, object]:
    return {"signature": live_pki.signature(nonce=nonce, created_on=datetime.now(UTC) - timedelta(seconds=5))}


def test_default_application_takes_challenges_only(test_pki: GeneratedPki, tmp_path: Path) -> None:
    # Outside gunicorn nothing says the application listens on loopback only.
    client = create_app(settings_for(test_pki, f"sqlite:///{tmp_path / 'nonces.sqlite3'}"), clock=Clock()).test_client()
    own = client.post("/v1/verify", json={"signature": test_pki.signature(nonce="my-own-nonce")})
    assert own.status_code == 422, own.get_data(as_text=True)
    assert own.get_json()["error"]["code"] == "nonce_unknown"
    issued = client.post("/v1/challenges")
    assert issued.status_code == 201
    nonce = issued.get_json()["nonce"]
    accepted = client.post("/v1/verify", json={"signature": test_pki.signature(nonce=nonce), "nonce": nonce})
    assert accepted.status_code == 200, accepted.get_data(as_text=True)
    assert accepted.get_json()["nonce"]["challenge"] is True


def test_allow_open_admits_own_nonces(test_pki: GeneratedPki, tmp_path: Path) -> None:
    settings = settings_for(test_pki, f"sqlite:///{tmp_path / 'nonces.sqlite3'}", ATTEST_ALLOW_OPEN="1")
    client = create_app(settings, clock=Clock()).test_client()
    assert client.post("/v1/verify", json={"signature": test_pki.signature(nonce="my-own-nonce")}).status_code == 200


@pytest.mark.parametrize("extra", [{"ATTEST_API_KEYS": API_KEYS_ENV}, {"ATTEST_POLICY_FILE": "/etc/policy.toml"}])
def test_allow_open_beside_keys_or_a_policy_is_refused(extra: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="ATTEST_ALLOW_OPEN"):
        Settings.from_env({"ATTEST_ALLOW_OPEN": "1", **extra})


@pytest.fixture
def bound() -> Iterator[list[socket.socket]]:
    """Sockets bound (never listening) to the addresses a test names."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _bind(sockets: list[socket.socket], family: socket.AddressFamily, address: object) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.bind(address)
    return sock


def test_loopback_only_reads_the_bound_addresses(bound: list[socket.socket], tmp_path: Path) -> None:
    loopback = _bind(bound, socket.AF_INET, ("127.0.0.1", 0))
    assert master.loopback_only([loopback])
    # Bound, not listening: nothing can connect to it.
    everywhere = _bind(bound, socket.AF_INET, ("0.0.0.0", 0))
    assert not master.loopback_only([everywhere])
    assert not master.loopback_only([loopback, everywhere])
    unix = _bind(bound, socket.AF_UNIX, str(tmp_path / "s"))
    assert not master.loopback_only([unix])
    assert not master.loopback_only([])
    assert master.is_loopback("::1")
    assert master.is_loopback("::ffff:127.0.0.1")
    assert not master.is_loopback("10.1.2.3")
    assert not master.is_loopback("localhost")




def _env(live_pki: GeneratedPki, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir),
            "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}", **extra}


def _own_nonce_status(service: LiveService, live_pki: GeneratedPki,
                      headers: dict[str, str] | None = None) -> tuple[int, object]:
    status, body = service.json("POST", "/v1/verify", _fresh(live_pki, uuid.uuid4().hex[:20]), headers)
    return status, body.get("error")


@pytest.mark.slow
def test_serve_on_loopback_stays_open_and_says_so(live_pki: GeneratedPki, tmp_path: Path) -> None:
    with live_service(_env(live_pki, tmp_path), tmp_path, workers=1) as service:
        assert _own_nonce_status(service, live_pki) == (200, None)
        # A request a proxy forwarded to the loopback socket may be anyone's: it needs a challenge.
        for header in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}):
            status, error = _own_nonce_status(service, live_pki, header)
            assert (status, isinstance(error, dict) and error["code"]) == (422, "nonce_unknown")
    assert OPEN_WARNING in service.log.read_text()
    assert "listens on loopback only" in service.log.read_text()
    # The warning says what loopback-only assumes: nothing on the host forwards to it without saying so.
    assert "a reverse proxy on this host that adds no X-Forwarded-For or Forwarded header" in service.log.read_text()


@pytest.mark.slow
def test_serve_beyond_loopback_takes_challenges_only(live_pki: GeneratedPki, tmp_path: Path) -> None:
    with live_service(_env(live_pki, tmp_path), tmp_path, workers=1, unix_socket=True) as service:
        status, error = _own_nonce_status(service, live_pki)
        assert status == 422
        assert isinstance(error, dict)
        assert error["code"] == "nonce_unknown"
        status, issued = service.json("POST", "/v1/challenges")
        assert status == 201
        nonce = str(issued["nonce"])
        status, verified = service.json("POST", "/v1/verify", {**_fresh(live_pki, nonce), "nonce": nonce})
        assert status == 200, verified
    assert OPEN_WARNING not in service.log.read_text()


@pytest.mark.slow
def test_serve_beyond_loopback_opens_only_when_asked(live_pki: GeneratedPki, tmp_path: Path) -> None:
    env = _env(live_pki, tmp_path, ATTEST_ALLOW_OPEN="1")
    with live_service(env, tmp_path, workers=1, unix_socket=True) as service:
        assert _own_nonce_status(service, live_pki) == (200, None)
    assert "ATTEST_ALLOW_OPEN=1" in service.log.read_text()


@pytest.mark.slow
def test_serve_refuses_allow_open_with_keys() -> None:
    env = {**os.environ, "ATTEST_ALLOW_OPEN": "1", "ATTEST_API_KEYS": API_KEYS_ENV}
    result = subprocess.run([sys.executable, "-m", "attest_service", "serve", "--bind", "127.0.0.1:1"],
                            env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "ATTEST_ALLOW_OPEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_trusted_proxies_keep_a_loopback_service_closed() -> None:
    # A loopback socket behind a proxy the operator names is reachable from anywhere through that proxy.
    plain = Settings.from_env({})
    proxied = Settings.from_env({"ATTEST_TRUSTED_PROXIES": "127.0.0.1/32"})
    assert master.open_access(plain, loopback=True)
    assert not master.open_access(proxied, loopback=True)
    assert master.open_access(Settings.from_env({"ATTEST_TRUSTED_PROXIES": "127.0.0.1/32", "ATTEST_ALLOW_OPEN": "1"}),
                              loopback=True)
