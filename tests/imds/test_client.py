"""The attest client against the emulator and a verification endpoint, over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from attest_service.imds.client import (
    AttestationRefused,
    AttestClient,
    ImdsRefused,
    ImdsUnavailable,
    RetryPolicy,
    ServiceUnavailable,
    StaleDocument,
    signed_nonce_of,
)
from attest_service.imds.emulator import EmulatorPki, EmulatorSettings, Fault, RunningEmulator

from .conftest import REPO_ROOT
from .servers import FakeClock, emulator, verification_service

# Every test talks to the emulator or the service over loopback HTTP servers.
pytestmark = pytest.mark.slow

FAST = RetryPolicy(gone_budget=70.0, max_transient_attempts=4, initial_backoff=0.5, max_backoff=8.0,
                   stale_refetches=3, stale_wait=1.0)  # fmt: skip


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def service(emulator_pki_dir: Path) -> Iterator[str]:
    with verification_service(emulator_pki_dir) as url:
        yield url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _imds(signing: EmulatorPki, clock: FakeClock, *faults: str):
    return emulator(EmulatorSettings(faults=[Fault.parse(f) for f in faults]), signing, clock=clock)


def _client(service: str, imds: RunningEmulator, clock: FakeClock, **overrides: object) -> AttestClient:
    options: dict[str, object] = {"retry": FAST, "sleep": clock.sleep, "monotonic": clock.monotonic}
    options.update(overrides)
    return AttestClient(service_url=service, imds_url=imds.url, **options)  # type: ignore[arg-type]


def test_attests_end_to_end(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock) as imds:
        verdict = _client(service, imds, clock, cloud="public").attest()
    assert verdict["verified"] is True
    assert verdict["cloud"] == "public"
    assert clock.sleeps == []


def test_recovers_from_410_with_backoff(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock, "410:4") as imds:
        assert _client(service, imds, clock).attest()["verified"] is True
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]


def test_gives_up_on_410_after_70_seconds(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock, "410:1000") as imds, pytest.raises(ImdsUnavailable) as caught:
        _client(service, imds, clock).attest()
    assert caught.value.exit_code == 3
    assert sum(clock.sleeps) <= 70.0
    assert sum(clock.sleeps) > 40.0
    assert max(clock.sleeps) == 8.0


@pytest.mark.parametrize("fault", ["500:3"])
def test_recovers_from_server_errors(service: str, emulator_signing: EmulatorPki, clock: FakeClock, fault: str) -> None:
    with _imds(emulator_signing, clock, fault) as imds:
        assert _client(service, imds, clock).attest()["verified"] is True
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_gives_up_on_persistent_server_errors(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock, "500:10") as imds, pytest.raises(ImdsUnavailable, match="500"):
        _client(service, imds, clock).attest()
    assert len(clock.sleeps) == FAST.max_transient_attempts - 1


def test_recovers_from_throttling(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    settings = EmulatorSettings(max_requests_per_second=1)
    with emulator(settings, emulator_signing, clock=clock) as imds:
        # Use up the second's only request, so the client's first fetch is throttled.
        client = _client(service, imds, clock)
        with pytest.raises(ImdsRefused):
            AttestClient(service_url=service, imds_url=imds.url, api_version="1999-01-01").fetch_document("x")
        assert client.attest()["verified"] is True
    assert clock.sleeps == [0.5, 1.0]


def test_refetches_a_cached_document(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock, "cached-nonce:2") as imds:
        assert _client(service, imds, clock).attest()["verified"] is True
    assert clock.sleeps == [1.0, 1.0]


def test_gives_up_on_a_document_that_stays_cached(
    service: str, emulator_signing: EmulatorPki, clock: FakeClock
) -> None:
    with _imds(emulator_signing, clock, "cached-nonce:100") as imds, pytest.raises(StaleDocument) as caught:
        _client(service, imds, clock).attest()
    assert caught.value.exit_code == 3
    assert len(clock.sleeps) == FAST.stale_refetches


def test_all_faults_together(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock, "410:2", "500:1", "cached-nonce:1") as imds:
        assert _client(service, imds, clock).attest()["verified"] is True


def test_imds_unreachable(service: str, clock: FakeClock) -> None:
    client = AttestClient(service_url=service, imds_url=_closed_port_url(), sleep=clock.sleep)
    with pytest.raises(ImdsUnavailable) as caught:
        client.attest()
    assert caught.value.exit_code == 3


def test_imds_refusal_is_not_retried(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock) as imds, pytest.raises(ImdsRefused, match="api-version"):
        _client(service, imds, clock, api_version="2099-01-01").attest()
    assert clock.sleeps == []


def test_imds_is_never_reached_through_a_proxy(
    service: str, emulator_signing: EmulatorPki, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_proxy = _closed_port_url()
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with _imds(emulator_signing, clock) as imds:
        nonce = "through-no-proxy"
        document = _client(service, imds, clock).fetch_document(nonce)
    assert signed_nonce_of(str(document["signature"])) == nonce


def test_service_unreachable(emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock) as imds, pytest.raises(ServiceUnavailable) as caught:
        _client(_closed_port_url(), imds, clock).attest()
    assert caught.value.exit_code == 4


def test_wrong_api_key_is_a_refusal(emulator_pki_dir: Path, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with verification_service(emulator_pki_dir, api_key="s3cret") as url, _imds(emulator_signing, clock) as imds:
        with pytest.raises(AttestationRefused) as caught:
            _client(url, imds, clock, api_key="wrong").attest()
        assert _client(url, imds, clock, api_key="s3cret").attest()["verified"] is True
    assert caught.value.exit_code == 1
    assert caught.value.verdict["error"] == {"code": "unauthorized", "message": "key missing or wrong"}


def test_document_refused_by_the_service(service: str, emulator_signing: EmulatorPki, clock: FakeClock) -> None:
    with _imds(emulator_signing, clock) as imds, pytest.raises(AttestationRefused) as caught:
        _client(service, imds, clock, cloud="usgov").attest()
    assert caught.value.verdict["verified"] is False


def test_undecodable_document_is_refused() -> None:
    with pytest.raises(ImdsRefused):
        signed_nonce_of("not base64!")
    with pytest.raises(ImdsRefused):
        signed_nonce_of("AAAA")


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy(max_transient_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(stale_wait=-1)


# --- the command ----------------------------------------------------------------------------------


def _attest(*arguments: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "attest_service", "attest", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_command_exit_codes(service: str, emulator_signing: EmulatorPki) -> None:
    dead = _closed_port_url()
    with emulator(EmulatorSettings(max_requests_per_second=100), emulator_signing) as imds:
        verified = _attest("--service", service, "--imds-url", imds.url, "--cloud", "public")
        refused = _attest("--service", service, "--imds-url", imds.url, "--cloud", "china")
        no_service = _attest("--service", dead, "--imds-url", imds.url)
    no_imds = _attest("--service", service, "--imds-url", dead)
    usage = _attest("--imds-url", dead)
    assert (verified.returncode, json.loads(verified.stdout)["verified"]) == (0, True), verified.stderr
    assert (refused.returncode, json.loads(refused.stdout)["verified"]) == (1, False)
    assert (no_service.returncode, json.loads(no_service.stdout)["error"]["code"]) == (4, "service_unavailable")
    assert (no_imds.returncode, json.loads(no_imds.stdout)["error"]["code"]) == (3, "imds_unavailable")
    assert usage.returncode == 2
    for result in (verified, refused, no_service, no_imds, usage):
        assert "Traceback" not in result.stderr
