"""The gunicorn hooks of the shipped configuration, in a real gevent hub (no server needed)."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
import types

import pytest
from prometheus_client import REGISTRY

from attest_service.server.gunicorn_conf import post_worker_init
from tests.web.conftest import AppFactory, GeneratedPki

#: A busy keep-alive connection (its next request always waiting) and a quiet one whose request has
#: arrived: the index at which the quiet one is served, with the shipped post_request hook between the
#: busy one's requests.
_TURNS = textwrap.dedent("""
    import gevent
    import gevent.socket
    from gunicorn.workers.ggevent import GeventWorker

    from attest_service.server.gunicorn_conf import post_request

    worker = object.__new__(GeventWorker)  # the hook reads only the worker's class
    sender, receiver = gevent.socket.socketpair()
    served = []

    def busy():
        for _ in range(200):
            served.append("busy")
            post_request(worker, None, None, None)

    def quiet():
        receiver.recv(1)
        served.append("quiet")

    waiting = gevent.spawn(quiet)
    gevent.sleep(0.01)  # the quiet connection now waits in its read
    sender.send(b"x")
    gevent.joinall([gevent.spawn(busy), waiting])
    print(served.index("quiet"))
""")


@pytest.mark.slow
def test_post_request_lets_a_waiting_request_in_after_one_turn() -> None:
    # With sleep(0) the busy connection kept the worker for all 200 requests: gevent resumes those
    # greenlets before it polls for I/O again. The shipped hook waits for the next loop iteration.
    result = subprocess.run([sys.executable, "-c", _TURNS], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 10, result.stdout


def test_sighup_to_a_worker_reloads_its_pinned_trust_on_the_next_request(make_client: AppFactory,
                                                                       test_pki: GeneratedPki) -> None:
    client = make_client()
    worker = types.SimpleNamespace(wsgi=client.application)  # the hook reads only the worker's application
    previous = signal.getsignal(signal.SIGHUP)

    def reloads() -> float:
        return REGISTRY.get_sample_value("attest_trust_reload_total", {"result": "success"}) or 0.0

    try:
        post_worker_init(worker)
        assert signal.getsignal(signal.SIGHUP) is not previous
        before = reloads()
        signal.raise_signal(signal.SIGHUP)
        response = client.post("/v1/verify", json={"document": test_pki.document(nonce="sighup-0001"),
                                                   "nonce": "sighup-0001"})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert reloads() == before + 1
    finally:
        signal.signal(signal.SIGHUP, previous)
        gc.unfreeze()
