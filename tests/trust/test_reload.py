"""Hot reload of the pinned directory by TrustHolder, and the trust metrics."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from attest_service.errors import ConfigurationError, UntrustedChain
from attest_service.trust import fingerprint
from attest_service.trust.pins import add_pins, remove_pin
from attest_service.trust.reload import TrustHolder
from attest_service.verify import VerificationPolicy

from .conftest import Pki, make_ca, make_leaf, pem, sign_document

POLICY = VerificationPolicy()


class FakeClock:
    """A monotonic clock the test moves by hand, so interval logic is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _add(pinned: Path, certificate) -> None:  # type: ignore[no-untyped-def]
    add_pins(pinned, "public", pem(certificate), origin="test.pem", now=datetime.now(UTC))


def test_new_pin_is_seen_after_the_interval_and_not_before(pinned: Path, pki_set: Pki, leaf_key) -> None:
    clock = FakeClock()
    holder = TrustHolder(pinned, interval_seconds=10, clock=clock)
    successor = make_ca("Ops Test Issuing CA 02", pki_set.root, pki_set.now)
    document = sign_document(make_leaf(successor, leaf_key, pki_set.now), pki_set.now)
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    first = holder.verifier()
    _add(pinned, successor.certificate)
    clock.now += 9
    assert holder.verifier() is first  # inside the interval nothing is looked at
    clock.now += 1
    assert holder.verifier() is not first
    result = holder.verify(document, policy=POLICY, now=pki_set.now)
    assert result.signer.issuer.startswith("CN=Ops Test Issuing CA 02")
    assert _sample("attest_verifications_by_issuer_total", issuer="Ops Test Issuing CA 02") >= 1


def test_unchanged_directory_keeps_the_same_verifier(pinned: Path) -> None:
    clock = FakeClock()
    holder = TrustHolder(pinned, interval_seconds=1, clock=clock)
    first = holder.verifier()
    successes = _sample("attest_trust_reload_total", result="success")
    clock.now += 5
    assert holder.verifier() is first
    assert _sample("attest_trust_reload_total", result="success") == successes


def test_broken_directory_keeps_the_last_good_trust(pinned: Path, pki_set: Pki,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    holder = TrustHolder(pinned, interval_seconds=1, clock=clock)
    good = holder.verifier()
    failures = _sample("attest_trust_reload_total", result="failure")
    garbage = pinned / "public" / "intermediates" / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with caplog.at_level(logging.ERROR, logger="attest_service.trust.reload"):
        for _ in range(3):
            clock.now += 1
            assert holder.verifier() is good
    assert holder.failing
    assert _sample("attest_trust_reload_failing") == 1
    assert _sample("attest_trust_reload_total", result="failure") == failures + 1  # same content: tried once
    assert len([r for r in caplog.records if "keeping the last good trust" in r.getMessage()]) == 1
    # Documents keep verifying with the last good trust meanwhile.
    holder.verify(sign_document(pki_set.leaf, pki_set.now), policy=POLICY, now=pki_set.now)
    garbage.unlink()
    clock.now += 1
    holder.verifier()
    assert not holder.failing
    assert _sample("attest_trust_reload_failing") == 0


def test_removed_directory_keeps_the_last_good_trust(pinned: Path, tmp_path: Path) -> None:
    clock = FakeClock()
    holder = TrustHolder(pinned, interval_seconds=1, clock=clock)
    good = holder.verifier()
    moved = tmp_path / "moved"
    pinned.rename(moved)
    clock.now += 1
    assert holder.verifier() is good
    assert holder.failing
    moved.rename(pinned)
    clock.now += 1
    holder.verifier()
    assert not holder.failing


def test_request_reload_forces_a_load(pinned: Path) -> None:
    holder = TrustHolder(pinned, interval_seconds=30, clock=FakeClock())
    first = holder.verifier()
    holder.request_reload()
    assert holder.verifier() is not first


def test_start_up_without_trust_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        TrustHolder(tmp_path / "absent", interval_seconds=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no pinned certificate"):
        TrustHolder(tmp_path / "empty", interval_seconds=1)


def test_pinned_expiry_gauges_follow_the_trust(pinned: Path, pki_set: Pki) -> None:
    clock = FakeClock()
    holder = TrustHolder(pinned, interval_seconds=1, clock=clock)
    issuing = pki_set.issuing.certificate
    labels = {"cloud": "public", "role": "intermediate", "subject": "Ops Test Issuing CA 01",
              "sha256": fingerprint(issuing)}
    assert _sample("attest_pinned_certificate_not_after_seconds", **labels) == issuing.not_valid_after_utc.timestamp()
    remove_pin(pinned, "public", fingerprint(issuing))
    clock.now += 1
    holder.verifier()
    assert REGISTRY.get_sample_value("attest_pinned_certificate_not_after_seconds", labels) is None


def test_unpinned_issuer_is_counted(pinned: Path, pki_set: Pki, leaf_key) -> None:
    holder = TrustHolder(pinned, interval_seconds=10, clock=FakeClock())
    stranger = make_ca("Ops Rotation CA 77", pki_set.root, pki_set.now)
    document = sign_document(make_leaf(stranger, leaf_key, pki_set.now), pki_set.now)
    before = _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 77")
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 77") == before + 1


def test_requests_during_rotation_never_fail(pinned: Path, pki_set: Pki, leaf_key) -> None:
    # Real clock, short interval: verifying threads run while pins are added and removed underneath.
    holder = TrustHolder(pinned, interval_seconds=0.01)
    document = sign_document(pki_set.leaf, pki_set.now)
    failures: list[BaseException] = []
    stop = threading.Event()
    counts = [0]

    def verify_loop() -> None:
        while not stop.is_set():
            try:
                holder.verify(document, policy=POLICY, now=pki_set.now)
                counts[0] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(exc)

    threads = [threading.Thread(target=verify_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    reloads = _sample("attest_trust_reload_total", result="success")
    try:
        for index in range(5):
            extra = make_ca(f"Ops Churn CA {index}", pki_set.root, pki_set.now)
            _add(pinned, extra.certificate)
            time.sleep(0.03)
            remove_pin(pinned, "public", fingerprint(extra.certificate))
            time.sleep(0.03)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not failures
    assert counts[0] > 0
    assert _sample("attest_trust_reload_total", result="success") > reloads
