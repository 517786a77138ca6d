"""A real ``attest-service serve`` process (gunicorn master and workers) on a free loopback port.

``running_service(env, workdir, workers=2)`` starts the service the way an operator does, with ``env`` added
to the environment, waits until ``/healthz`` answers and stops the whole process group on exit::

    factory = DocumentFactory.around_now(workdir / "pinned")
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": "redis://..."}
    with running_service(env, workdir) as service:
        reply = service.post("/v1/verify", factory.verify_body("nonce-1"))
        assert reply.status == 200

The service runs on the system clock, so :class:`DocumentFactory` generates its PKI around the current time
and signs documents created a few seconds ago.

By default the child runs the source tree's package (``python -m attest_service`` with the repository on
``PYTHONPATH``). ``gunicorn_config=PATH`` runs ``python -m gunicorn --config PATH`` instead of ``serve``: a test's
own configuration file that takes the service's hooks and names its own application factory (for what no
setting may give the service, such as a CA server on loopback).

``command=[".../bin/attest-service"]`` runs an installed console script instead, in ``workdir``, with neither
``PYTHONPATH`` nor the caller's ``ATTEST_*`` variables: only what ``env`` sets.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from attest_service.imds import pki
from tests.support.redis_server import LOOPBACK, free_port

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
#: Seconds the service may take until /healthz answers (workers import Flask and load the pins).
STARTUP_TIMEOUT_SECONDS: Final = 30.0
#: Seconds gunicorn gets to finish after SIGTERM before its process group is killed.
SHUTDOWN_TIMEOUT_SECONDS: Final = 25.0
#: Seconds one HTTP request to the service may take.
REQUEST_TIMEOUT_SECONDS: Final = 10.0
#: Age of a freshly signed document, so that a verifier clock a little behind ours still accepts it.
DOCUMENT_AGE: Final = timedelta(seconds=5)
#: Subscription the generated documents are signed for.
SUBSCRIPTION: Final = "8a205152-0000-4000-8000-000000000001"
#: The VM the generated documents are signed for, unless one is named: a document signed again over the same
#: nonce is then the same VM's, which the service refuses as a replay (nonces are claimed per VM).
VM_ID: Final = "5d1e0a7c-0000-4000-8000-00000000a001"
_POLL_SECONDS: Final = 0.05
#: Variables that could route the service's own outbound requests elsewhere; tests speak loopback only.
_PROXY_VARIABLES: Final = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def api_keys_env(keys: Mapping[str, str]) -> str:
    """``ATTEST_API_KEYS`` for ``{client_id: key}``: each key as its hex SHA-256 digest."""
    return ",".join(f"{client}:{hashlib.sha256(key.encode()).hexdigest()}" for client, key in keys.items())


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer of the service: status and decoded JSON body (empty when the body is not JSON)."""

    status: int
    body: dict[str, object]

    @property
    def code(self) -> str | None:
        """The error code of a refusal, ``None`` for a success."""
        error = self.body.get("error")
        return str(error["code"]) if isinstance(error, dict) else None


@dataclass(frozen=True, slots=True)
class DocumentFactory:
    """An Azure-shaped PKI generated around the current time, pinned in ``pinned_dir``, that signs documents."""

    leaf: pki.CertifiedKey
    pinned_dir: Path

    @classmethod
    def around_now(cls, pinned_dir: Path) -> DocumentFactory:
        """Generate the PKI and write its root and issuing CA to ``pinned_dir`` (cloud ``public``)."""
        root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=datetime.now(UTC))
        pki.write_pinned_dir(pinned_dir, "public", root=root.certificate, intermediates=[issuing.certificate])
        return cls(leaf=leaf, pinned_dir=pinned_dir)

    def signature(self, nonce: str, *, vm_id: str = VM_ID) -> str:
        """Base64 PKCS7 of a fresh document of VM ``vm_id`` whose signed nonce is ``nonce``."""
        created_on = datetime.now(UTC) - DOCUMENT_AGE
        content = pki.attested_content(
            nonce=nonce, vm_id=vm_id, subscription_id=SUBSCRIPTION, sku="20_04-lts-gen2",
            plan=("gold", "widget", "contoso"), license_type="", created_on=created_on,
            expires_on=created_on + pki.DOCUMENT_LIFETIME)
        return base64.b64encode(pki.sign_attested(content, signer=self.leaf)).decode()

    def verify_body(self, nonce: str, *, vm_id: str = VM_ID) -> dict[str, object]:
        """A ``POST /v1/verify`` body: the IMDS response object of a fresh document, checked against ``nonce``."""
        return {"document": {"encoding": "pkcs7", "signature": self.signature(nonce, vm_id=vm_id)}, "nonce": nonce,
                "cloud": "public"}


class ServiceProcess:
    """``attest-service serve --bind 127.0.0.1:PORT --workers N`` in its own process group."""

    def __init__(self, env: Mapping[str, str], workdir: Path, *, workers: int = 2,
                 command: Sequence[str] | None = None, gunicorn_config: Path | None = None) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.workers = workers
        self.log = workdir / f"serve-{self.port}.log"
        self._metrics_dir = workdir / f"metrics-{self.port}"
        self._env = dict(env)
        self._command = list(command) if command is not None else None
        self._gunicorn_config = gunicorn_config
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the gunicorn master while running (``serve`` replaces itself with gunicorn)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self) -> ServiceProcess:
        """Start the service and wait until ``/healthz`` answers 200; returns ``self``."""
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if key not in _PROXY_VARIABLES}
        if self._command is None:
            program = [sys.executable, "-m", "attest_service"]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            cwd = None
        else:
            # An installed program: nothing of the source tree importable, no setting but the caller's.
            program = self._command
            env = {key: value for key, value in env.items() if key != "PYTHONPATH" and not key.startswith("ATTEST_")}
            cwd = self._workdir
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        env.update(self._env)
        argv = [*program, "serve", "--bind", f"{self.host}:{self.port}", "--workers", str(self.workers)]
        if self._gunicorn_config is not None:
            argv = [sys.executable, "-m", "gunicorn", "--config", str(self._gunicorn_config),
                    "--bind", f"{self.host}:{self.port}", "--workers", str(self.workers)]
        with self.log.open("ab") as output:
            # A session of its own: on a stuck shutdown the master and its workers are killed as one group.
            self._process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"serve exited before answering:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/healthz").status == 200:
                    return
            time.sleep(_POLL_SECONDS)
        raise RuntimeError(f"serve did not answer /healthz within {STARTUP_TIMEOUT_SECONDS} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the master (graceful), SIGKILL to the whole group if it does not finish; idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log_tail(self, characters: int = 3000) -> str:
        """The end of the service's output, for failure messages."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-characters:]
        return "(no log)"

    def request(self, method: str, path: str, body: object = None, *, key: str | None = None) -> Reply:
        """Send one request on a new connection; ``key`` goes in ``Authorization: Bearer``."""
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body).encode(),
                               headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = {}
        return Reply(response.status, decoded if isinstance(decoded, dict) else {})

    def get(self, path: str) -> Reply:
        """``GET path``."""
        return self.request("GET", path)

    def post(self, path: str, body: object = None, *, key: str | None = None) -> Reply:
        """``POST path`` with a JSON body."""
        return self.request("POST", path, body, key=key)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_service(env: Mapping[str, str], workdir: Path, *, workers: int = 2,
                    command: Sequence[str] | None = None) -> Iterator[ServiceProcess]:
    """A started :class:`ServiceProcess` (``command``: see the module's docstring), stopped on exit."""
    with ServiceProcess(env, workdir, workers=workers, command=command) as service:
        yield service
