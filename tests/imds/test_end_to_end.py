"""End to end: the emulator command, the real service under gunicorn, a real nonce store, ``attest``.

Every piece runs as its own process, started the way an operator would start it: ``attest-service
imds-emulator`` pins its PKI in a directory, ``attest-service serve`` trusts that directory through
``ATTEST_PINNED_CERTS`` and records nonces in SQLite or a real ``redis-server``, and ``attest-service
attest`` plays the VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import jwt
import pytest

from attest_service.imds.client import AttestClient, RetryPolicy
from tests.support import tools
from tests.support.redis_server import free_port, redis_server

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow

API_KEY = "vendor-key-0123456789"
#: How long the service may take to answer /readyz after start, in seconds.
STARTUP_TIMEOUT_SECONDS = 30.0
#: Quick retries, so the fault scenarios take well under a second of waiting.
QUICK_RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=0.2, stale_wait=0.05)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    env.update(extra)
    return env


def _stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextmanager
def imds_emulator(pki_dir: Path, *faults: str) -> Iterator[str]:
    command = [sys.executable, "-m", "attest_service", "imds-emulator", "--bind", "127.0.0.1:0",
               "--pki-dir", str(pki_dir)]  # fmt: skip
    if faults:
        command += ["--fault", *faults]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the emulator exited before listening"
        yield json.loads(line)["url"]
    finally:
        _stop(process)


@contextmanager
def attest_service(pki_dir: Path, store_url: str, log: Path) -> Iterator[str]:
    port = free_port()
    env = _env(
        ATTEST_PINNED_CERTS=str(pki_dir),
        ATTEST_NONCE_STORE=store_url,
        ATTEST_API_KEYS=f"vendor:{hashlib.sha256(API_KEY.encode()).hexdigest()}",
    )
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "attest_service", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            assert process.poll() is None, f"the service exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"the service never became ready: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url
    finally:
        _stop(process)


def _attest(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "attest_service", "attest", *arguments],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=False,
    )


def _post(url: str, body: object, *, key: str = API_KEY) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


STORES = [
    "sqlite",
    pytest.param("redis", marks=tools.requires_redis),
]


@pytest.mark.parametrize("store", STORES)
def test_vm_attests_to_the_service(tmp_path: Path, store: str) -> None:
    pki_dir = tmp_path / "pki"
    with ExitStack() as stack:
        if store == "redis":
            store_url = stack.enter_context(redis_server(tmp_path / "redis")).url
        else:
            store_url = f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
        imds = stack.enter_context(imds_emulator(pki_dir, "410:1", "500:1", "cached-nonce:1"))
        service = stack.enter_context(attest_service(pki_dir, store_url, tmp_path / "service.log"))

        # 1. The VM attests through the command, despite IMDS starting up, failing once and caching.
        verified = _attest("--service", service, "--imds-url", imds, "--api-key", API_KEY, "--cloud", "public")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        verdict = json.loads(verified.stdout)
        assert verdict["verified"] is True
        assert verdict["cloud"] == "public"
        assert verdict["claims"]["vmId"] == "00000000-0000-4000-8000-000000000002"
        if store == "sqlite":
            # The embedded store's generated key signs an attestation result, printed with the verdict.
            jwks = jwt.PyJWKClient(service + "/.well-known/jwks.json", cache_jwk_set=False)
            token = verdict["token"]
            result = jwt.decode(token, key=jwks.get_signing_key_from_jwt(token), algorithms=["ES256"],
                                audience="vendor")
            assert result["sub"] == verdict["claims"]["vmId"]
        else:
            assert "token" not in verdict  # a shared store without ATTEST_RESULT_KEYS: results are off

        # 2. A wrong key is refused by the service: exit 1 with the service's verdict.
        refused = _attest("--service", service, "--imds-url", imds, "--api-key", "wrong", "--cloud", "public")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["error"]["code"] == "unauthorized"

        # 3. A document is accepted once: the same document and challenge again is a replay.
        client = AttestClient(service_url=service, imds_url=imds, api_key=API_KEY, cloud="public", retry=QUICK_RETRY)
        nonce = client.challenge()
        document = client.fetch_document(nonce)
        first = _post(service + "/v1/verify", {"document": document, "nonce": nonce, "cloud": "public"})
        again = _post(service + "/v1/verify", {"document": document, "nonce": nonce, "cloud": "public"})
        assert first[0] == 200, first
        assert again[0] == 409, again
        assert again[1]["error"]["code"] == "nonce_replayed"  # type: ignore[index]

        # 4. A document signed for the wrong cloud is refused with the service's code.
        wrong_cloud = _attest("--service", service, "--imds-url", imds, "--api-key", API_KEY, "--cloud", "usgov")
        assert wrong_cloud.returncode == 1
        assert json.loads(wrong_cloud.stdout)["verified"] is False


def test_attest_without_imds_or_service(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with imds_emulator(tmp_path / "pki") as imds:
        no_service = _attest("--service", dead, "--imds-url", imds)
    assert no_service.returncode == 4
    with attest_service(tmp_path / "pki", f"sqlite:///{tmp_path / 'n.sqlite3'}", tmp_path / "log") as service:
        no_imds = _attest("--service", service, "--imds-url", dead, "--api-key", API_KEY)
    assert no_imds.returncode == 3
    assert json.loads(no_imds.stdout)["error"]["code"] == "imds_unavailable"
