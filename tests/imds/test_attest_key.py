"""The VM-side ``attest``: where its API key comes from, and that the key never follows a redirect.

A key given with ``--api-key`` is readable by every local user in ``/proc/PID/cmdline``; ``--api-key-file``
and ``ATTEST_API_KEY`` are not. The service never redirects, so ``attest`` follows no redirect at all: a 3xx
from the service (or from whoever answers at its URL) fails the exchange, and the origin the redirect names
receives nothing, neither the key nor the document. Everything runs over real HTTP on loopback: the command
in-process, a verification endpoint, the IMDS emulator, and a recording server on another host and port.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from attest_service import cli
from attest_service.imds.emulator import EmulatorPki, EmulatorSettings

from .servers import emulator, verification_service

# Every test talks to the emulator, the service or another origin over loopback HTTP servers.
pytestmark = pytest.mark.slow

KEY = "vendor-key-7Qm2x9"
#: A second loopback address: another host than 127.0.0.1 as far as an origin goes.
OTHER_HOST = "127.0.0.2"


@dataclass
class Recorder:
    """What a loopback HTTP server received: one (method, path, headers) per request."""

    url: str = ""
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@contextmanager
def serve(host: str, answer: tuple[int, dict[str, str], bytes]) -> Iterator[Recorder]:
    """A server on ``host`` that records each request and gives every one the same ``answer``."""
    recorder = Recorder()
    status, headers, body = answer

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            recorder.requests.append((self.command, self.path, dict(self.headers.items())))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815 - the names http.server dispatches to

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
            pass

    httpd = ThreadingHTTPServer((host, 0), Handler)
    httpd.daemon_threads = True
    recorder.url = f"http://{host}:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _attest(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(["attest", *arguments])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTEST_API_KEY", raising=False)


# --- where the key comes from ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["environment", "file", "option"])
def test_the_key_is_taken_from_the_environment_a_file_or_the_option(
        source: str, emulator_pki_dir: Path, emulator_signing: EmulatorPki, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    arguments: list[str] = []
    if source == "environment":
        monkeypatch.setenv("ATTEST_API_KEY", KEY)
    elif source == "file":
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n", encoding="utf-8")  # as `echo KEY > file` writes it
        key_file.chmod(0o600)
        arguments = ["--api-key-file", str(key_file)]
    else:
        arguments = ["--api-key", KEY]
    with verification_service(emulator_pki_dir, api_key=KEY) as service, \
            emulator(EmulatorSettings(), emulator_signing) as imds:
        code, out, err = _attest(capsys, "--service", service, "--imds-url", imds.url, "--cloud", "public",
                                 *arguments)
    assert code == 0, err
    assert json.loads(out)["verified"] is True


def test_the_option_wins_over_the_environment(emulator_pki_dir: Path, emulator_signing: EmulatorPki,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ATTEST_API_KEY", "a-stale-key")
    with verification_service(emulator_pki_dir, api_key=KEY) as service, \
            emulator(EmulatorSettings(), emulator_signing) as imds:
        code, _, err = _attest(capsys, "--service", service, "--imds-url", imds.url, "--api-key", KEY)
    assert code == 0, err


def test_without_any_key_the_service_refuses(emulator_pki_dir: Path, emulator_signing: EmulatorPki,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with verification_service(emulator_pki_dir, api_key=KEY) as service, \
            emulator(EmulatorSettings(), emulator_signing) as imds:
        code, out, _ = _attest(capsys, "--service", service, "--imds-url", imds.url)
    assert code == 1
    assert json.loads(out)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("setup", "message"), [
    ("missing file", "cannot read the key"),
    ("empty file", "the API key is empty"),
    ("line break in the key", "control character"),
    ("space in the key", "a space"),
    ("both options", "not allowed with argument"),
])
def test_an_unusable_key_is_a_usage_error_and_nothing_is_sent(
        setup: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "key"
    arguments = ["--api-key-file", str(key_file)]
    if setup == "empty file":
        key_file.write_text("\n", encoding="utf-8")
    elif setup == "line break in the key":
        monkeypatch.setenv("ATTEST_API_KEY", "abc\r\nX-Injected: 1")
        arguments = []
    elif setup == "space in the key":
        key_file.write_text("two words", encoding="utf-8")
    elif setup == "both options":
        key_file.write_text(KEY, encoding="utf-8")
        arguments += ["--api-key", KEY]
    with serve("127.0.0.1", (201, {"Content-Type": "application/json"}, b'{"nonce": "n"}')) as service:
        code, out, err = _attest(capsys, "--service", service.url, "--imds-url", "http://127.0.0.1:9", *arguments)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert out == ""
    assert service.requests == []


# --- redirects -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("route", ["/v1/challenges", "/v1/verify"])
def test_a_redirect_is_not_followed_and_the_other_origin_gets_nothing(
        status: int, route: str, emulator_pki_dir: Path, emulator_signing: EmulatorPki,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ATTEST_API_KEY", KEY)
    nonce = json.dumps({"nonce": "a-challenge", "expiresAt": "2030-01-01T00:00:00+00:00"}).encode()
    with serve(OTHER_HOST, (201, {"Content-Type": "application/json"}, nonce)) as elsewhere, \
            verification_service(emulator_pki_dir, api_key=KEY) as real, \
            emulator(EmulatorSettings(), emulator_signing) as imds:
        # The first hop answers the challenge itself when only /v1/verify redirects, so the document is
        # fetched and the redirect of the submission is what is tested.
        redirect = {"Location": elsewhere.url + route, "Content-Type": "text/html"}
        with serve("127.0.0.1", (status, redirect, b"<a>moved</a>")) as redirector:
            front: AbstractContextManager[str] = (
                nullcontext(redirector.url) if route == "/v1/challenges" else _split_service(real, redirector.url))
            with front as url:
                code, out, err = _attest(capsys, "--service", url, "--imds-url", imds.url, "--cloud", "public")
    assert code == 4, (out, err)
    assert json.loads(out)["error"]["code"] == "service_unavailable"
    assert f"answered {status}" in err
    assert "redirects are not followed" in err
    assert elsewhere.requests == []


@contextmanager
def _split_service(real: str, redirector: str) -> Iterator[str]:
    """A front on loopback sending /v1/challenges to ``real`` and /v1/verify to ``redirector``, byte for byte."""
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            target = urlsplit(real if self.path == "/v1/challenges" else redirector)
            connection = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
            try:
                connection.request("POST", self.path, body=body, headers=dict(self.headers.items()))
                answer = connection.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            finally:
                connection.close()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    recorder.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield recorder.url
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
