"""The request's edges under real gunicorn workers, spoken to over raw sockets where HTTP itself is the input.

A source blocked for failed authentication, bodies that stall, and chunked bodies that are malformed, cut
short or reset: each is answered the same way by the direct WSGI path and by Flask, with no 500, no
traceback in the log and no ``internal_error`` counted.

One service serves the module; it believes ``X-Forwarded-For`` from loopback, so that each test speaks for
a source of its own and a block in one test touches no other.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.web.conftest import API_KEYS_ENV, KEYS, GeneratedPki
from tests.web.live import LiveService, live_service

pytestmark = pytest.mark.slow

#: Failed authentications a source may have per minute in this module's service.
AUTH_FAILURES = 2


@pytest.fixture(scope="module")
def service(live_pki: GeneratedPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    workdir = tmp_path_factory.mktemp("edges")
    env = {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir),
           "ATTEST_NONCE_STORE": f"sqlite:///{workdir / 'nonces.sqlite3'}",
           "ATTEST_API_KEYS": API_KEYS_ENV,
           "ATTEST_TRUSTED_PROXIES": "127.0.0.1/32",
           "ATTEST_AUTH_FAILURES_PER_MINUTE": str(AUTH_FAILURES)}
    with live_service(env, workdir, workers=2) as running:
        both_workers_serve(running)
        yield running


def both_workers_serve(service: LiveService) -> None:
    """Wait until both workers have answered: /healthz answers once the first one has booted."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # Connections open at once are shared out between the workers (the balanced accept).
        connections = [socket.create_connection((service.host, service.port), timeout=10) for _ in range(4)]
        for sock in connections:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: attest\r\n\r\n")
        for sock in connections:
            read_answer(sock)
            sock.close()
        if len({line["pid"] for line in log_lines(service) if line.get("path") == "/healthz"}) == 2:
            return
        time.sleep(0.2)
    raise AssertionError("the second worker never answered")


def exchange(service: LiveService, raw: bytes, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection, read until the server closes or a whole answer is in."""
    with socket.create_connection((service.host, service.port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of one answer read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return int(lines[0].split()[1]), headers, body


def request_head(path: str, source: str, *, key: str | None = None, length: int | None = None,
                 chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: attest", "Content-Type: application/json",
             f"X-Forwarded-For: {source}"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def log_lines(service: LiveService) -> list[dict[str, object]]:
    return [json.loads(line) for line in service.log.read_text().splitlines() if line.startswith("{")]


# --- a blocked source ----------------------------------------------------------------------------------


def test_a_blocked_source_gets_429_whatever_its_key_on_every_worker(service: LiveService) -> None:
    source = "198.51.100.1"
    body = b'{"signature": "AAAA"}'
    for _ in range(AUTH_FAILURES):
        assert exchange(service, request_head("/v1/challenges", source, key="guess", length=0))[0] == 401
    status, headers, _ = exchange(service, request_head("/v1/challenges", source, key="guess", length=0))
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    # On connections open at once, which the workers share out between them (the balanced accept), so that
    # both workers answer: the block is the instance's, not one worker's.
    connections = [socket.create_connection((service.host, service.port), timeout=10) for _ in range(4)]
    try:
        for key in [KEYS["license-server"], KEYS["billing"], "guess", None]:
            for sock in connections:
                for path, data in (("/v1/challenges", b""), ("/v1/verify", body)):
                    sock.sendall(request_head(path, source, key=key, length=len(data)) + data)
                    status, headers, answer = read_answer(sock)
                    assert status == 429, (path, key, answer)
                    assert json.loads(answer)["error"]["code"] == "rate_limited"
                    assert int(headers["retry-after"]) >= 1
    finally:
        for sock in connections:
            sock.close()
    blocked_pids = {line["pid"] for line in log_lines(service)
                    if line.get("status") == 429 and line.get("path") in ("/v1/challenges", "/v1/verify")}
    assert len(blocked_pids) == 2, "the connections did not reach both workers"
    # Another source with the right key is served meanwhile.
    other = request_head("/v1/challenges", "198.51.100.2", key=KEYS["billing"], length=0)
    assert exchange(service, other)[0] == 201
