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
import struct
import time
from collections.abc import Iterator

import pytest

from tests.web.conftest import API_KEYS_ENV, KEYS, GeneratedPki
from tests.web.live import LiveService, live_service

pytestmark = pytest.mark.slow

#: Failed authentications a source may have per minute in this module's service.
AUTH_FAILURES = 2
#: Seconds a body may take in this module's service (ATTEST_BODY_TIMEOUT_SECONDS).
BODY_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def service(live_pki: GeneratedPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    workdir = tmp_path_factory.mktemp("edges")
    env = {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir),
           "ATTEST_NONCE_STORE": f"sqlite:///{workdir / 'nonces.sqlite3'}",
           "ATTEST_API_KEYS": API_KEYS_ENV,
           "ATTEST_TRUSTED_PROXIES": "127.0.0.1/32",
           "ATTEST_AUTH_FAILURES_PER_MINUTE": str(AUTH_FAILURES),
           "ATTEST_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}
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


# --- bodies that stall ----------------------------------------------------------------------------------


def assert_answered_then_closed(sock: socket.socket, status: int, code: str) -> None:
    answer_status, _, answer = read_answer(sock)
    assert (answer_status, json.loads(answer)["error"]["code"]) == (status, code), answer
    # The unread rest of the body is still on the connection: it is closed rather than read for ever.
    assert sock.recv(1) == b""


@pytest.mark.parametrize("chunked", [False, True], ids=["direct path, announced length", "flask, chunked"])
def test_a_body_that_stalls_is_answered_408_within_the_body_timeout(service: LiveService, chunked: bool) -> None:
    source = "198.51.100.20" if chunked else "198.51.100.21"
    head = request_head("/v1/verify", source, key=KEYS["license-server"], length=None if chunked else 1000,
                        chunked=chunked)
    with socket.create_connection((service.host, service.port), timeout=BODY_TIMEOUT + 5) as sock:
        started = time.monotonic()
        sock.sendall(head + (b"3e8\r\n{" if chunked else b"{"))
        assert_answered_then_closed(sock, 408, "request_timeout")
        assert BODY_TIMEOUT - 0.2 <= time.monotonic() - started <= BODY_TIMEOUT + 3


def test_a_body_that_trickles_is_held_to_the_whole_timeout_not_per_read(service: LiveService) -> None:
    head = request_head("/v1/verify", "198.51.100.22", key=KEYS["license-server"], length=1000)
    with socket.create_connection((service.host, service.port), timeout=BODY_TIMEOUT + 5) as sock:
        started = time.monotonic()
        sock.sendall(head)
        # A byte every fifth of the timeout: each read gets data soon, the whole body never comes. The last
        # byte goes well before the deadline: one still unread when the service closes would make its kernel
        # reset the connection, and a reset may discard the answer before this side reads it.
        last_sent = started
        while time.monotonic() - started < BODY_TIMEOUT - BODY_TIMEOUT / 5:
            sock.send(b" ")
            last_sent = time.monotonic()
            time.sleep(BODY_TIMEOUT / 5)
        assert_answered_then_closed(sock, 408, "request_timeout")
        answered = time.monotonic()
        # A deadline per read would answer no sooner than one whole timeout after the last byte.
        assert answered - last_sent < BODY_TIMEOUT, (last_sent - started, answered - started)
        assert answered - started <= BODY_TIMEOUT + 3


# --- bodies that are malformed, cut short or reset ------------------------------------------------------


MALFORMED_CHUNKED = {
    "chunk size not hex": b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk without its terminator": b"2\r\n{}XX0\r\n\r\n",
    "chunk size line too long": b"1" + b" " * 9000 + b"\r\n{\r\n0\r\n\r\n",
    "bad chunk extension": b"2;\x01\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", MALFORMED_CHUNKED.values(), ids=MALFORMED_CHUNKED.keys())
def test_a_malformed_chunked_body_is_400(service: LiveService, body: bytes) -> None:
    head = request_head("/v1/verify", "198.51.100.30", key=KEYS["license-server"], chunked=True)
    status, _, answer = exchange(service, head + body)
    assert (status, json.loads(answer)["error"]["code"]) == (400, "malformed_request")


@pytest.mark.parametrize("chunked", [False, True], ids=["direct path, announced length", "flask, chunked"])
def test_a_body_cut_short_is_400_on_both_paths(service: LiveService, chunked: bool) -> None:
    head = request_head("/v1/verify", "198.51.100.31", key=KEYS["license-server"], length=None if chunked else 100,
                        chunked=chunked)
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(head + (b"64\r\n{\"sig" if chunked else b"{\"sig"))
        sock.shutdown(socket.SHUT_WR)  # the client is done sending, and still reads
        status, _, answer = read_answer(sock)
    assert (status, json.loads(answer)["error"]["code"]) == (400, "malformed_request")


@pytest.mark.parametrize("chunked", [False, True], ids=["direct path, announced length", "flask, chunked"])
def test_a_connection_reset_mid_body_is_closed_quietly(service: LiveService, chunked: bool) -> None:
    head = request_head("/v1/verify", "198.51.100.32", key=KEYS["license-server"], length=None if chunked else 100,
                        chunked=chunked)
    sock = socket.create_connection((service.host, service.port), timeout=10)
    sock.sendall(head + (b"64\r\n{\"sig" if chunked else b"{\"sig"))
    time.sleep(0.2)  # let the worker wait in the middle of the body
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    sock.close()
    # The worker is still there and answers; what it logged and counted is checked at the end of the module.
    assert service.request("GET", "/healthz")[0] == 200


#: Framing headers gunicorn refuses itself, before the application sees the request.
UNUSABLE_FRAMING = {
    "negative length": ["Content-Length: -1"],
    "signed length": ["Content-Length: +2"],
    "two lengths": ["Content-Length: 2", "Content-Length: 3"],
    "length and chunked": ["Content-Length: 2", "Transfer-Encoding: chunked"],
    "identity coding": ["Transfer-Encoding: identity"],
}


def gunicorns_own_refusals(service: LiveService) -> int:
    """Access lines of answers gunicorn wrote itself (they carry no request id)."""
    return len([line for line in log_lines(service)
                if line.get("status") == 400 and line.get("path") == "/v1/verify" and line.get("request_id") == "-"])


@pytest.mark.parametrize("headers", UNUSABLE_FRAMING.values(), ids=UNUSABLE_FRAMING.keys())
def test_framing_that_gunicorn_refuses_is_its_400_and_logged(service: LiveService, headers: list[str]) -> None:
    before = gunicorns_own_refusals(service)
    head = request_head("/v1/verify", "198.51.100.33", key=KEYS["license-server"])
    raw = head.replace(b"\r\n\r\n", ("".join(f"\r\n{line}" for line in headers) + "\r\n\r\n").encode())
    status, _, _ = exchange(service, raw + b"2\r\n{}\r\n0\r\n\r\n")
    # Not a 500 from a failing access line: the traceback check closes the module.
    assert status == 400
    deadline = time.monotonic() + 5
    while gunicorns_own_refusals(service) == before:
        assert time.monotonic() < deadline, "no access line for gunicorn's answer"
        time.sleep(0.05)


def test_no_edge_of_a_request_was_an_internal_error(service: LiveService) -> None:
    # Last in the module: every request above has been answered or dropped by now.
    time.sleep(0.5)
    status, _, metrics = service.request("GET", "/metrics")
    assert status == 200
    counted = [line for line in metrics.decode().splitlines()
               if line.startswith("attest_verifications_total{") and 'code="internal_error"' in line]
    assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in counted), counted
    log = service.log.read_text()
    assert "Traceback" not in log
    assert not [line for line in log_lines(service) if line.get("status") == 500]
