"""The China fetch end to end through real gunicorn workers: fetched at each worker's start, then verifying.

No setting can let the service fetch from loopback (the SSRF rules refuse private and loopback addresses, and
that is not configurable by design). So the test writes a gunicorn configuration file of its own: it takes
every hook of the service's configuration (:mod:`attest_service.server.gunicorn_conf`) and names, as the WSGI
application, a factory in the same file that calls the service's ``create_app`` with the fingerprint fetcher
given a loopback CA server, the way the in-process tests give it. Everything else is the service as it
runs: a gunicorn master, forked gevent workers, the pinned directory and the embedded store from the
environment, and each worker's own background fetch at start.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from attest_service.imds import pki
from attest_service.trust import fingerprint
from attest_service.trust.aia import AiaPolicy, AllowRule
from attest_service.trust.fetched import CACHE_DIR_NAME
from attest_service.trust.pins import add_fingerprint_pin
from tests.support.service import ServiceProcess

from .conftest import CaServer, digicert_name, make_leaf, make_named_ca, sign_document

WORKERS = 2
#: Seconds the workers' fetches and metric may take to show up (the workers fetch at once; this is a bound).
WAIT_SECONDS = 20.0
_POLL_SECONDS = 0.05
CA_PATH = "/DigiCertBasicRSACNCAG2.crt"
#: What a worker logs once it fetched the pinned CA from its URL (trust/fetched.py).
FETCHED_MESSAGE = "fingerprint pin Ops Basic RSA CN CA (china): fetched "
#: What a worker logs once its trust in use holds a fetched fingerprint-pinned CA (trust/reload.py).
IN_USE_MESSAGE = ": fingerprint-pinned CAs fetched and in use"

#: The test's gunicorn configuration: the service's, with an application factory that gives the fingerprint
#: fetcher a CA server on loopback (an allow-list naming it, an address check admitting loopback).
GUNICORN_CONF = '''\
"""gunicorn configuration of a test: the service's hooks, and this file's factory as the application."""
from pathlib import Path

from attest_service.server.gunicorn_conf import *  # noqa: F403 - every hook and limit of the service

pythonpath = str(Path(__file__).resolve().parent)
wsgi_app = "served_china_conf:make_app()"


def make_app():
    from attest_service.trust.aia import AiaPolicy, AllowRule
    from attest_service.trust.fetched import PinnedCaFetcher, cache_dir_for_store
    from attest_service.trust.issuers import CertificateFetcher
    from attest_service.settings import Settings
    from attest_service.web.app import create_app

    settings = Settings.from_env()
    rule = AllowRule(scheme="http", host="127.0.0.1", port={port}, path_prefix="/")
    fetcher = PinnedCaFetcher(policy=AiaPolicy(allow={{"china": (rule,)}}),
                              cache_dir=cache_dir_for_store(settings.nonce_store_url),
                              fetcher=CertificateFetcher(allow_address=lambda address: address.is_loopback))
    return create_app(settings, pinned_fetch=fetcher)
'''


def _verify_body(document: bytes, nonce: str) -> dict[str, object]:
    return {"document": {"encoding": "pkcs7", "signature": base64.b64encode(document).decode()},
            "nonce": nonce, "cloud": "china"}


def _wait(condition: Callable[[], object], what: str, service: ServiceProcess) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT_SECONDS} s:\n{service.log_tail()}"
        time.sleep(_POLL_SECONDS)


def _pids(service: ServiceProcess, message: str) -> set[int]:
    """The processes that logged a line holding ``message`` (the service logs one JSON object a line)."""
    pids: set[int] = set()
    for line in service.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and message in str(entry.get("message", "")):
                pids.add(int(entry["pid"]))
    return pids


def _metrics(service: ServiceProcess) -> str:
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def test_served_workers_fetch_chinas_pinned_ca_at_start_and_verify_only_after(
        server: CaServer, leaf_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    # A China-shaped PKI from the repository's tools: DigiCert-named root and issuing CA, a metadata.azure.cn signer.
    root = make_named_ca(digicert_name("Ops DigiCert Global Root CA"), None, now, days=3650)
    issuing = make_named_ca(digicert_name("Ops DigiCert Basic RSA CN CA G2"), root, now)
    pins = tmp_path / "pins"
    pki.write_pinned_dir(pins, "china", root=root.certificate, intermediates=[])
    url = server.publish(CA_PATH, issuing.certificate.public_bytes(serialization.Encoding.DER))
    allow = AiaPolicy(allow={"china": (AllowRule(scheme="http", host="127.0.0.1", port=server.port,
                                                 path_prefix="/"),)})
    digest = fingerprint(issuing.certificate)
    add_fingerprint_pin(pins, "china", digest, url=url, name="Ops Basic RSA CN CA", now=now, policy=allow)
    leaf = make_leaf(issuing, leaf_key, now, ca_issuers=[url], domain="metadata.azure.cn")

    conf = tmp_path / "served_china_conf.py"
    conf.write_text(GUNICORN_CONF.format(port=server.port), encoding="utf-8")
    store = tmp_path / "nonces.sqlite3"
    env = {"ATTEST_PINNED_CERTS": str(pins), "ATTEST_NONCE_STORE": f"sqlite:///{store}",
           "ATTEST_FINGERPRINT_FETCH": "1", "ATTEST_AIA_FETCH": "0", "ATTEST_ALLOW_OPEN": "1",
           "ATTEST_TRUST_RELOAD_SECONDS": "1"}
    # The CA server holds its answer until the document has been refused: the fetch has started, not finished.
    release = server.hold(CA_PATH)
    with ServiceProcess(env, tmp_path, workers=WORKERS, gunicorn_config=conf) as service:
        assert server.arrived[CA_PATH].wait(WAIT_SECONDS), service.log_tail()
        refused = service.post("/v1/verify", _verify_body(sign_document(leaf, now, nonce="china-before"),
                                                          "china-before"))
        assert (refused.status, refused.code) == (422, "untrusted_chain"), refused
        release.set()

        # The workers fetch at their own start, not the master; a worker may instead take the CA another one
        # wrote beside the SQLite file, under the same checks. Either way every worker has it in use.
        _wait(lambda: len(_pids(service, IN_USE_MESSAGE)) == WORKERS, "every worker holding the CA", service)
        fetching = _pids(service, FETCHED_MESSAGE)
        assert fetching, service.log_tail()
        assert service.pid not in fetching | _pids(service, IN_USE_MESSAGE)
        fetches = server.hits[CA_PATH]
        assert 1 <= fetches <= WORKERS
        fetched = re.compile(r'attest_fingerprint_pin_fetched\{[^}]*state="fetched"[^}]*\} 1\.0')
        # The metric, from whichever worker answers /metrics (each reports its own fetcher).
        _wait(lambda: all(fetched.search(_metrics(service)) for _ in range(2 * WORKERS)),
              "attest_fingerprint_pin_fetched{state=\"fetched\"} on the answering workers", service)
        metrics = _metrics(service)
        assert f'digest="{digest}"' in metrics
        assert 'cloud="china"' in metrics

        # Every worker now verifies China's documents; the pinned CA came from the fetch alone.
        for index in range(2 * WORKERS):
            nonce = f"china-after-{index}"
            reply = service.post("/v1/verify", _verify_body(sign_document(leaf, now, nonce=nonce), nonce))
            assert reply.status == 200, (reply, service.log_tail())
        # Verifying fetched nothing more: the CA was in use before the first accepted document.
        assert server.hits[CA_PATH] == fetches
    # The embedded store keeps the fetched CA beside its SQLite file, for a start without network.
    assert [path.read_bytes() for path in (tmp_path / CACHE_DIR_NAME).iterdir()] != []
