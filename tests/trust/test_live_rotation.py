"""A running service under load takes a new pin with no restart and no failed request (real gunicorn)."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from attest_service.trust import fingerprint
from attest_service.trust.pins import add_pins
from attest_service.verify import common_name
from tests.web.live import LiveService, live_service

from .conftest import Pki, make_ca, make_leaf, pem, sign_document

pytestmark = pytest.mark.slow

#: Reload interval of the service under test, in seconds (the setting's lowest value).
RELOAD_SECONDS = 1
#: The contract: a change to the pinned directory is live within 30 seconds.
PICKUP_LIMIT_SECONDS = 30.0
#: Threads submitting documents while the pin is added.
LOAD_THREADS = 4


def _body(leaf, now: datetime) -> dict[str, object]:  # type: ignore[no-untyped-def]
    document = sign_document(leaf, now, nonce=uuid.uuid4().hex[:32])
    return {"signature": base64.b64encode(document).decode()}


def _status(service: LiveService, leaf) -> int:  # type: ignore[no-untyped-def]
    return service.request("POST", "/v1/verify", _body(leaf, datetime.now(UTC)))[0]


def test_new_pin_is_taken_under_load_without_restart(pinned: Path, pki_set: Pki, leaf_key, tmp_path: Path) -> None:
    env = {"ATTEST_PINNED_CERTS": str(pinned), "ATTEST_TRUST_RELOAD_SECONDS": str(RELOAD_SECONDS),
           "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}",
           "ATTEST_RATE_LIMIT_PER_MINUTE": "1000000",
           # This test is about trust rotation: a generous store timeout keeps an occasional slow SQLite
           # commit (fsync on a busy machine) from answering 503, which the store tests cover on their own.
           "ATTEST_STORE_TIMEOUT_SECONDS": "5"}
    successor = make_ca("Ops Live Issuing CA 02", pki_set.root, pki_set.now)
    new_leaf = make_leaf(successor, leaf_key, pki_set.now)
    with live_service(env, tmp_path, workers=2) as service:
        assert _status(service, new_leaf) == 422  # not pinned yet
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        loaded = threading.Event()

        def load() -> None:
            while not stop.is_set():
                status = _status(service, pki_set.leaf)
                with lock:
                    statuses[status] += 1
                    if sum(statuses.values()) >= LOAD_THREADS:
                        loaded.set()

        threads = [threading.Thread(target=load) for _ in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        try:
            workers = service.worker_pids()
            assert len(workers) == 2
            assert loaded.wait(PICKUP_LIMIT_SECONDS), "no load"
            # Both workers serve the load with the old trust before the pin is added: a worker that only
            # started serving afterwards would load the new pin at its start and prove nothing.
            old = {"issuer": common_name(pki_set.issuing.certificate.subject)}
            while set(service.counted_by_process("attest_verifications_by_issuer_total", old)) != set(workers):
                assert time.monotonic() - started < PICKUP_LIMIT_SECONDS, "the load did not reach both workers"
                time.sleep(0.05)
            add_pins(pinned, "public", pem(successor.certificate), origin="ca02.pem", now=datetime.now(UTC))
            added = time.monotonic()
            # Until each worker has verified a document under the new pin (each counts its own verifications
            # by issuer): a worker that kept the old trust answers 422 and never shows up here.
            issuer = {"issuer": "Ops Live Issuing CA 02"}
            while set(service.counted_by_process("attest_verifications_by_issuer_total", issuer)) != set(workers):
                assert time.monotonic() - added < PICKUP_LIMIT_SECONDS, (
                    f"not every worker took the new pin in time: "
                    f"{service.counted_by_process('attest_verifications_by_issuer_total', issuer)} of {workers}")
                _status(service, new_leaf)
            # Both workers have the new pin, so every request takes it; neither was restarted for it.
            assert [_status(service, new_leaf) for _ in range(20)] == [200] * 20
            assert service.worker_pids() == workers
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)
        assert set(statuses) == {200}, statuses
        assert statuses[200] > 20
        status, _, body = service.request("GET", "/metrics")
        text = body.decode()
        assert status == 200
        assert fingerprint(successor.certificate) in text
        assert 'attest_trust_reload_total{result="success"}' in text
        assert 'attest_verifications_by_issuer_total{issuer="Ops Live Issuing CA 02"}' in text
