"""Loopback servers for the IMDS tests: the emulator in-process, and a verification endpoint.

The verification endpoint answers ``/v1/challenges`` and ``/v1/verify`` with the real verification core
and real pinned trust read from the emulator's directory; it stands in for the web layer only, so the
client can be exercised against real HTTP before and independently of the full service (the end-to-end
test runs the real service).
"""

from __future__ import annotations

import http.client
import json
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from flask import Flask, Response, request
from werkzeug.serving import make_server

from attest_service.errors import AttestError
from attest_service.imds.emulator import EmulatorPki, EmulatorSettings, RunningEmulator, create_app
from attest_service.trust import load_trust
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode


class FakeClock:
    """A monotonic clock that only moves when told: the client's sleeps advance the emulator's window."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@contextmanager
def emulator(
    settings: EmulatorSettings, signing: EmulatorPki, *, clock: FakeClock | None = None
) -> Iterator[RunningEmulator]:
    kwargs = {"monotonic": clock.monotonic} if clock is not None else {}
    app = create_app(settings, signing, **kwargs)  # type: ignore[arg-type]
    with RunningEmulator(app, host="127.0.0.1", port=0) as running:
        yield running


def http_get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes, str]:
    """GET over loopback with exactly the given headers; returns status, body and content type."""
    parts = url.split("/", 3)
    host, port = parts[2].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/" + parts[3], headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        connection.close()


def verification_app(pki_dir: Path, *, api_key: str | None = None) -> Flask:
    app = Flask(__name__)
    issued: set[str] = set()
    lock = threading.Lock()

    def authorized() -> bool:
        return api_key is None or request.headers.get("Authorization") == f"Bearer {api_key}"

    def refuse(status: int, code: str, message: str) -> Response:
        body = {"verified": False, "error": {"code": code, "message": message}}
        return Response(json.dumps(body), status=status, content_type="application/json")

    @app.post("/v1/challenges")
    def challenges() -> Response:
        if not authorized():
            return refuse(401, "unauthorized", "key missing or wrong")
        nonce = secrets.token_hex(16)
        with lock:
            issued.add(nonce)
        body = {"nonce": nonce, "expiresAt": datetime.now(UTC).isoformat()}
        return Response(json.dumps(body), status=201, content_type="application/json")

    @app.post("/v1/verify")
    def verify() -> Response:
        if not authorized():
            return refuse(401, "unauthorized", "key missing or wrong")
        body = request.get_json(force=True)
        nonce = body["nonce"]
        try:
            result = DocumentVerifier(load_trust(pki_dir)).verify(
                decode(body["document"]),
                policy=VerificationPolicy(cloud=body["cloud"], expected_nonce=nonce),
                now=datetime.now(UTC),
            )
        except AttestError as exc:
            return refuse(422, exc.code, exc.message)
        with lock:
            if nonce not in issued:
                return refuse(409, "nonce_replayed", "the nonce was already accepted")
            issued.discard(nonce)
        return Response(json.dumps(result.to_dict()), status=200, content_type="application/json")

    return app


@contextmanager
def verification_service(pki_dir: Path, *, api_key: str | None = None) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, verification_app(pki_dir, api_key=api_key), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
