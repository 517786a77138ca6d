"""Revocation drill: the signer of documents being posted under load is revoked, and its CRL dropped in.

A real ``attest-service serve`` (gunicorn master and workers, the default ``soft`` revocation) runs on a
generated Azure-shaped PKI whose trust directory holds current CRLs of the root and of the issuing CA that list
nothing. A client posts genuine documents signed by one leaf at :data:`RATE_PER_SECOND`. Then the operator
revokes that leaf: a new CRL of the issuing CA listing it replaces the old one (``os.replace``, as ``certs crls
fetch`` writes it). The drill counts the documents accepted after the new CRL is in place and before the
refusals start, and checks that none is accepted later than the reload interval (plus the time one request
takes): each worker picks the directory up at its next check. Then it reads what the operator sees:
``attest_verifications_total{code="certificate_revoked"}``, ``attest_crl_next_update_timestamp_seconds`` of the
new CRL, and the log line naming the revoked certificate and the CRL. The figures are printed (``-s`` is not needed).

The reload interval is the shortest the setting allows (``ATTEST_TRUST_RELOAD_SECONDS=1``), so that the drill
takes seconds: with the default of 10 s the window is ten times as long at the same rate.

Rerun: ``.venv/bin/python -m pytest -q tests/trust/test_revocation_drill.py``.
"""

from __future__ import annotations

import base64
import http.client
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest

from attest_service.imds import pki
from tests.support import crls
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.slow

#: Genuine documents a second the client sends.
RATE_PER_SECOND: Final = 20.0
#: The trust reload interval of the drill's service (the setting's smallest value).
RELOAD_SECONDS: Final = 1.0
#: Load before the revocation, all of which must verify.
WARM_UP_SECONDS: Final = 1.0
#: Load kept on after the CRL is in place: every worker has passed its interval well before the end.
AFTER_SECONDS: Final = RELOAD_SECONDS + 3.0
#: Seconds one request may take beyond the interval (the acceptance decided before the reload was seen).
REQUEST_MARGIN_SECONDS: Final = 1.0
WORKERS: Final = 2
CRL_FILE: Final = "public/crls/issuing-ca.crl"


@dataclass(frozen=True, slots=True)
class Sent:
    """One document posted: when, and the answer."""

    started: float
    finished: float
    status: int
    code: str | None


@dataclass
class LoadClient:
    """Posts genuine documents of one leaf at a steady rate, each with a fresh nonce and VM."""

    service: ServiceProcess
    leaf: pki.CertifiedKey
    records: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        interval = 1.0 / RATE_PER_SECOND
        next_send = time.monotonic()
        while not self._stop.is_set():
            nonce = uuid.uuid4().hex
            created_on = datetime.now(UTC) - timedelta(seconds=5)
            content = pki.attested_content(nonce=nonce, vm_id=str(uuid.uuid4()), subscription_id="8a205152-0000-"
                                           "4000-8000-000000000001", sku="sku", plan=("", "", ""), license_type="",
                                           created_on=created_on, expires_on=created_on + pki.DOCUMENT_LIFETIME)
            signature = base64.b64encode(pki.sign_attested(content, signer=self.leaf)).decode()
            body = {"document": {"encoding": "pkcs7", "signature": signature}, "nonce": nonce, "cloud": "public"}
            started = time.monotonic()
            try:
                reply = self.service.post("/v1/verify", body)
                status, code = reply.status, reply.code
            except OSError as exc:
                status, code = 0, type(exc).__name__
            self.records.append(Sent(started, time.monotonic(), status, code))
            next_send += interval
            self._stop.wait(max(0.0, next_send - time.monotonic()))


def _metrics(service: ServiceProcess) -> str:
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def _sample(text: str, name: str, *labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def test_revocation_drill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pins = tmp_path / "pins"
    pki.write_pinned_dir(pins, "public", root=root.certificate, intermediates=[issuing.certificate])
    (pins / "public" / "crls").mkdir()
    (pins / "public" / "crls" / "root.crl").write_bytes(crls.der(crls.make_crl(root, now=now)))
    (pins / CRL_FILE).write_bytes(crls.der(crls.make_crl(issuing, now=now, number=1)))
    revoked_crl = crls.make_crl(issuing, revoked=[leaf.certificate.serial_number], now=now, number=2)
    env = {"ATTEST_PINNED_CERTS": str(pins), "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'nonces.sqlite3'}",
           "ATTEST_TRUST_RELOAD_SECONDS": f"{RELOAD_SECONDS:g}", "ATTEST_STORE_TIMEOUT_SECONDS": "5",
           "ATTEST_RATE_LIMIT_PER_MINUTE": "100000"}
    with ServiceProcess(env, tmp_path, workers=WORKERS) as service:
        client = LoadClient(service, leaf)
        client.start()
        try:
            time.sleep(WARM_UP_SECONDS)
            # The operator revokes: the new CRL replaces the old one in one rename.
            # The instant is taken before the write: a request started after it may meet either CRL.
            dropped = time.monotonic()
            _write_atomically(pins / CRL_FILE, crls.der(revoked_crl))
            time.sleep(AFTER_SECONDS)
        finally:
            client.stop()
        metrics = _metrics(service)
        log = service.log_tail(1_000_000)
    before = [r for r in client.records if r.finished < dropped]
    after = [r for r in client.records if r.started >= dropped]
    assert before, "no document was sent before the revocation"
    assert all(r.status == 200 for r in before), {(r.status, r.code) for r in before}
    accepted = [r for r in after if r.status == 200]
    refused = [r for r in after if r.status != 200]
    assert refused, "the revocation was never felt"
    assert {(r.status, r.code) for r in refused} == {(422, "certificate_revoked")}
    first_refusal = min(r.finished for r in refused) - dropped
    last_acceptance = max((r.finished for r in accepted), default=dropped) - dropped
    # Every worker has reloaded within its interval: nothing is accepted after it, and the tail is all refused.
    assert last_acceptance <= RELOAD_SECONDS + REQUEST_MARGIN_SECONDS, last_acceptance
    tail = [r for r in after if r.started >= dropped + RELOAD_SECONDS + REQUEST_MARGIN_SECONDS]
    assert tail, "the load did not outlast the reload interval"
    assert all(r.code == "certificate_revoked" for r in tail)

    # What the operator sees.
    revoked_count = _sample(metrics, "attest_verifications_total", 'code="certificate_revoked"')
    # Every refusal the senders saw, a request in flight across the write included, and nothing else.
    assert revoked_count == sum(1 for r in client.records if r.code == "certificate_revoked")
    next_update = _sample(metrics, "attest_crl_next_update_timestamp_seconds", f'file="{CRL_FILE}"')
    assert revoked_crl.next_update_utc is not None
    assert next_update == revoked_crl.next_update_utc.timestamp()
    revoked_line = re.search(r"[^\n]*refused a document signed under a revoked certificate[^\n]*", log)
    assert revoked_line is not None, log[-3000:]
    assert CRL_FILE in revoked_line.group(0)
    # Logged once per certificate and interval, not once per refusal: the sender chooses how often to send.
    assert log.count("refused a document signed under a revoked certificate") <= WORKERS

    with capsys.disabled():
        rate = len(after) / AFTER_SECONDS
        sys.stdout.write(
            f"\n\nrevocation drill: {WORKERS} workers, reload interval {RELOAD_SECONDS:g} s, {rate:.0f} documents/s\n"
            f"  accepted after the CRL was in place: {len(accepted)} of {len(after)} (last "
            f"{last_acceptance:.2f} s after it; first refusal {first_refusal:.2f} s after it)\n"
            f"  refused certificate_revoked: {len(refused)}; metric attest_verifications_total"
            f'{{code="certificate_revoked"}} {revoked_count:g}\n'
            f"  attest_crl_next_update_timestamp_seconds{{file=\"{CRL_FILE}\"}} {next_update:.0f}\n"
            f"  log: {revoked_line.group(0).strip()[:300]}\n")
