"""A worker respawned while the pinned directory or the policy file is broken serves with the last good ones.

Each worker loads the files when it boots; gunicorn halts when a worker cannot boot. The master keeps the
last good trust and policy (attest_service/server/master.py), loaded before each fork and every
ATTEST_TRUST_RELOAD_SECONDS, and a worker whose own load fails serves with them and reports the failure
(attest_trust_reload_failing or attest_policy_reload_failing, and their counters). Real gunicorn, one worker,
killed with SIGKILL as the kernel's OOM killer would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.imds import pki
from tests.web.conftest import API_KEYS_ENV, KEYS, SUBSCRIPTION, GeneratedPki
from tests.web.live import LiveService, live_service

pytestmark = pytest.mark.slow

#: Seconds to wait for a respawned worker, a reload, a metric.
WAIT_SECONDS = 20.0
#: The trust reload interval of the services under test (the master refreshes at the same interval).
RELOAD_SECONDS = 1
BROKEN_PEM = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"


@pytest.fixture
def live_pki(tmp_path: Path) -> GeneratedPki:
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=datetime.now(UTC))
    pinned = tmp_path / "pinned"
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    return GeneratedPki(root=root, issuing=issuing, leaf=leaf, pinned_dir=pinned)


def _body(live_pki: GeneratedPki, *, signer: pki.CertifiedKey | None = None, subscription: str = SUBSCRIPTION,
          nonce: str | None = None) -> dict[str, object]:
    created = datetime.now(UTC) - timedelta(seconds=5)
    return {"signature": live_pki.signature(signer=signer, created_on=created, subscription=subscription,
                                            **({"nonce": nonce} if nonce else {}))}


def _env(live_pki: GeneratedPki, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.db'}",
            "ATTEST_TRUST_RELOAD_SECONDS": str(RELOAD_SECONDS), "ATTEST_ALLOW_OPEN": "1", **extra}


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {WAIT_SECONDS} s: {what}")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_the_worker(service: LiveService) -> None:
    """SIGKILL the one worker and wait until its replacement answers."""
    (old,) = service.worker_pids()
    os.kill(old, signal.SIGKILL)

    def replaced() -> bool:
        if not _alive(service.pid):
            raise AssertionError(f"the gunicorn master exited:\n{service.log.read_text()[-3000:]}")
        pids = service.worker_pids()
        if not pids or old in pids:
            return False
        try:
            return service.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    _eventually(replaced, "a respawned worker answers /healthz")


def _metric(service: LiveService, sample: str) -> float:
    status, _, body = service.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


FAILING = "attest_trust_reload_failing"
FAILURES = 'attest_trust_reload_total{result="failure"}'


def _verified(service: LiveService, body: dict[str, object], headers: dict[str, str] | None = None) -> int:
    return service.json("POST", "/v1/verify", body, headers)[0]


def test_respawn_with_a_broken_pinned_directory_serves_the_last_good_trust(live_pki: GeneratedPki,
                                                                            tmp_path: Path) -> None:
    with live_service(_env(live_pki, tmp_path), tmp_path, workers=1) as service:
        assert _verified(service, _body(live_pki)) == 200
        broken = live_pki.pinned_dir / "public" / "intermediates" / "broken.pem"
        broken.write_bytes(BROKEN_PEM)
        _kill_the_worker(service)
        assert _verified(service, _body(live_pki)) == 200
        assert _metric(service, FAILING) == 1
        assert _metric(service, FAILURES) >= 1
        # Fixed: the worker's next reload takes the directory again and the alert clears.
        broken.unlink()
        _eventually(lambda: _verified(service, _body(live_pki)) == 200 and _metric(service, FAILING) == 0,
                    "the repaired directory is loaded")
    log = service.log.read_text()
    assert "keeping the last good trust" in log
    assert "workers started from now on serve the one loaded before" in log


def test_respawn_after_a_later_good_change_gets_the_newer_trust(live_pki: GeneratedPki, tmp_path: Path) -> None:
    # A second issuing CA, pinned while the service runs: the master's snapshot must follow it.
    now = datetime.now(UTC)
    issuing_b = pki.make_intermediate(common_name="Attest Respawn Issuing CA B", key=pki.new_key(),
                                      issuer=live_pki.root, not_before=now - timedelta(days=1),
                                      not_after=now + timedelta(days=30), serial=0x5EB)
    leaf_b = pki.make_leaf(dns_names=["metadata.azure.com"], common_name="metadata.azure.com", key=pki.new_key(),
                           issuer=issuing_b, not_before=now - timedelta(days=1), not_after=now + timedelta(days=30),
                           serial=0x5EC)
    with live_service(_env(live_pki, tmp_path), tmp_path, workers=1) as service:
        status, refused = service.json("POST", "/v1/verify", _body(live_pki, signer=leaf_b))
        assert status == 422
        assert refused["error"]["code"] == "untrusted_chain"  # type: ignore[index]
        pem = issuing_b.certificate.public_bytes(serialization.Encoding.PEM)
        (live_pki.pinned_dir / "public" / "intermediates" / "issuing-b.pem").write_bytes(pem)
        _eventually(lambda: _verified(service, _body(live_pki, signer=leaf_b)) == 200, "CA B is pinned")
        # A respawn while the directory is good: the master loads it before forking, whatever its timer did,
        # so its snapshot holds CA B once the new worker answers (no guess at when the timer ran).
        _kill_the_worker(service)
        assert _verified(service, _body(live_pki, signer=leaf_b)) == 200
        # Then the directory breaks and the worker is respawned again: the snapshot kept is the newer one.
        (live_pki.pinned_dir / "public" / "intermediates" / "broken.pem").write_bytes(BROKEN_PEM)
        _kill_the_worker(service)
        assert _verified(service, _body(live_pki, signer=leaf_b)) == 200
        assert _verified(service, _body(live_pki)) == 200
        assert _metric(service, FAILING) == 1


def test_respawn_with_a_broken_policy_file_serves_the_last_good_policy(live_pki: GeneratedPki,
                                                                       tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[clients.license-server]\nsubscriptions = ["{SUBSCRIPTION}"]\n')
    env = _env(live_pki, tmp_path, ATTEST_API_KEYS=API_KEYS_ENV, ATTEST_POLICY_FILE=str(policy))
    del env["ATTEST_ALLOW_OPEN"]
    key = {"Authorization": f"Bearer {KEYS['license-server']}"}
    other = "00000000-0000-4000-8000-00000000dead"
    with live_service(env, tmp_path, workers=1) as service:
        assert _verified(service, _body(live_pki), key) == 200
        assert _verified(service, _body(live_pki, subscription=other), key) == 403
        policy.write_text("[clients.license-server\nthis is not TOML")
        _kill_the_worker(service)
        # The same policy as before, not an open one: the allow-list still holds, keys are still required.
        assert _verified(service, _body(live_pki), key) == 200
        assert _verified(service, _body(live_pki, subscription=other), key) == 403
        assert _verified(service, _body(live_pki)) == 401
        assert _metric(service, "attest_policy_reload_failing") == 1
        assert _metric(service, 'attest_policy_reload_total{result="failure"}') >= 1
    assert "policy file is unusable" in service.log.read_text()


def test_a_master_whose_files_never_loaded_does_not_start(live_pki: GeneratedPki, tmp_path: Path) -> None:
    # There is no last good snapshot to fall back on; serve refuses (exit 2) before gunicorn starts.
    (live_pki.pinned_dir / "public" / "intermediates" / "broken.pem").write_bytes(BROKEN_PEM)
    with pytest.raises(RuntimeError, match="serve exited with 2"), live_service(_env(live_pki, tmp_path), tmp_path,
                                                                               workers=1):
        pass
