"""The embedded store loses no acceptance when the service is killed mid-load.

A real ``attest-service serve`` (gunicorn master and two workers) on the default embedded store takes fresh
documents from several connections; the whole process group is SIGKILLed while requests are in flight, the
service is started again on the same file, and every document that had been answered 200 is submitted again:
each must be refused as a replay. SQLite in WAL mode keeps every committed transaction across a crash of the
process whatever its ``synchronous`` level (the log is in the operating system's cache once written); only an
operating-system crash or a power cut can roll back commits made with ``synchronous=NORMAL``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Final

import pytest

from tests.support.service import DocumentFactory, Reply, ServiceProcess

pytestmark = pytest.mark.slow

#: Connections submitting documents at once.
SUBMITTERS: Final = 6
#: Acceptances to see before the kill (so that it lands mid-load, with requests in flight).
ACCEPTED_BEFORE_KILL: Final = 150
#: Seconds the load may take to reach that many acceptances.
LOAD_TIMEOUT_SECONDS: Final = 60.0
#: Seconds a resubmission may be refused for want of the store before it counts as an answer.
DECISION_TIMEOUT_SECONDS: Final = 10.0


def test_every_answered_acceptance_survives_a_sigkill(tmp_path: Path) -> None:
    factory = DocumentFactory.around_now(tmp_path / "pinned")
    # The default store of an install: no ATTEST_NONCE_STORE, the SQLite file under XDG_STATE_HOME.
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "XDG_STATE_HOME": str(tmp_path / "state"),
           "ATTEST_RATE_LIMIT_PER_MINUTE": "1000000", "ATTEST_LOG_LEVEL": "warning"}
    saved = os.environ.pop("ATTEST_NONCE_STORE", None)
    try:
        accepted = _accept_until_killed(ServiceProcess(env, tmp_path), factory)
        assert (tmp_path / "state" / "attest-service" / "nonces.sqlite3").exists()
        with ServiceProcess(env, tmp_path) as restarted:
            refusals = {nonce: decision(restarted, body) for nonce, body in accepted.items()}
    finally:
        if saved is not None:
            os.environ["ATTEST_NONCE_STORE"] = saved
    wrong = {nonce: reply for nonce, reply in refusals.items() if (reply.status, reply.code) != (409, "nonce_replayed")}
    assert not wrong, f"{len(wrong)} of {len(accepted)} acceptances were forgotten: {list(wrong.items())[:3]}"
    print(f"{len(accepted)} acceptances answered before the SIGKILL, all refused after the restart")


def decision(service: ServiceProcess, body: dict[str, object]) -> Reply:
    """The first answer that is not 503: on a busy machine the store may time out, which decides nothing."""
    deadline = time.monotonic() + DECISION_TIMEOUT_SECONDS
    while True:
        reply = service.post("/v1/verify", body)
        if reply.status != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def _accept_until_killed(service: ServiceProcess, factory: DocumentFactory) -> dict[str, dict[str, object]]:
    """Submit fresh documents from :data:`SUBMITTERS` connections; SIGKILL the process group mid-load.

    Returns the documents answered 200 (the answer read in full) before the kill, by nonce.
    """
    service.start()
    accepted: dict[str, dict[str, object]] = {}
    lock = threading.Lock()
    enough = threading.Event()
    killed = threading.Event()
    counter = iter(range(10**9))

    def submit() -> None:
        connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
        try:
            while not killed.is_set():
                with lock:
                    nonce = f"crash-{next(counter):08d}"
                body = factory.verify_body(nonce)
                try:
                    connection.request("POST", "/v1/verify", body=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    return  # the service is gone
                if response.status == 200 and not killed.is_set():
                    with lock:
                        accepted[nonce] = body
                        if len(accepted) >= ACCEPTED_BEFORE_KILL:
                            enough.set()
        finally:
            connection.close()

    threads = [threading.Thread(target=submit) for _ in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(LOAD_TIMEOUT_SECONDS), f"only {len(accepted)} acceptances:\n{service.log_tail()}"
        pid = service.pid
        assert pid is not None
        # The whole group at once (master and workers), as the kernel's OOM killer or a node failure would.
        with lock:
            os.killpg(pid, signal.SIGKILL)
            killed.set()
            answered = dict(accepted)
    finally:
        killed.set()
        for thread in threads:
            thread.join(timeout=30)
        service.stop()
    time.sleep(0.2)  # let the kernel reap the workers before the file is opened again
    return answered
