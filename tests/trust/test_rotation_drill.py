"""Rotation drill: a new issuing CA under a pinned root starts signing while the service runs under load.

For each shipped configuration (``make run``, the container image's defaults, the Helm chart's defaults,
each read from the file that ships it) a real ``attest-service serve`` (gunicorn master and workers) runs
on a generated Azure-shaped PKI while a client sends genuine documents at :data:`RATE_PER_SECOND`. Then
Azure "rotates": every new document is signed under ``Drill Issuing CA 02``, a new issuing CA under the
pinned root, which no pin names. The drill plays the operator: it waits until ``/metrics`` shows
``attest_unpinned_issuer_total`` (``issuer="unproven"``: Azure's documents carry no CA, so nothing proves the
new one is the cloud's; with the AIA fallback, which fetches and checks it, ``issuer="Drill Issuing CA 02"``),
reads the service's log line naming the issuer and its caIssuers URL, and runs the one command::

    attest-service certs add --cloud public --from-document DOC --issuer CA.crt

with a refused document and the CA downloaded from that URL. (The operator's ``certs add --from-document
DOC`` fetches the CA itself; here the URL is a CA server on loopback, which the command's fetcher refuses
by design, so the drill downloads it and passes ``--issuer``: the checks are the same.) The load goes on
for the reload interval and a margin; then the figures are printed: documents refused, for how long, how
long the operator's signal took, the command, and the pickup, which must be within 30 s.

A fourth run is the chart with ``settings.aiaFetch: true`` and the new CA on an allow-listed URL (the
loopback CA server, through ``tests/trust/drill_app.py``): no genuine document may be refused.

What differs from the shipped files, and why: the pinned directory is the drill's PKI (every deployment
mounts its own); the SQLite store lives in the test's directory; the store timeout is 5 s, so that a slow
commit on a busy machine cannot answer 503 (this drill is about trust; the store tests cover timeouts).
The operator here reacts at once: in production the refused count grows by the rate times the time it
takes someone to act on the alert, which is what the AIA fallback or a staged fingerprint pin removes.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest_service.cli.serve import DEFAULT_WORKERS
from attest_service.imds import pki
from tests.support.service import REPO_ROOT, ServiceProcess

from .conftest import CaServer, ca_server, make_leaf
from .drill_app import PATH_PREFIX, PORT_VARIABLE

pytestmark = pytest.mark.slow

#: Genuine documents a second the client sends (under the default rate limit of 600 a minute).
RATE_PER_SECOND: Final = 5.0
#: Seconds of load before the rotation, all of which must verify.
WARM_UP_SECONDS: Final = 1.0
#: The contract: a change to the pinned directory is live within 30 seconds.
PICKUP_LIMIT_SECONDS: Final = 30.0
#: Seconds the operator may wait for the metric and the log line.
SIGNAL_TIMEOUT_SECONDS: Final = 20.0
#: Load kept on after the command, beyond the reload interval, so every worker has passed its interval.
SETTLE_SECONDS: Final = 2.0
#: The new issuing CA's name and the caIssuers URL its leaves name (Microsoft's repository, as Azure's do).
NEW_CA: Final = "Drill Issuing CA 02"
NEW_CA_PATH: Final = PATH_PREFIX + "Drill%20Issuing%20CA%2002.crt"
MICROSOFT_URL: Final = "http://www.microsoft.com" + NEW_CA_PATH


# --- the shipped configurations, read from the files that ship them ------------------------------------------


@dataclass(frozen=True, slots=True)
class Configuration:
    """What a shipped way of running the service sets: environment, workers, AIA fallback."""

    name: str
    env: Mapping[str, str]
    workers: int

    @property
    def aia(self) -> bool:
        """Whether the AIA fallback is on."""
        return self.env.get("ATTEST_AIA_FETCH", "0") in ("1", "true", "yes")

    @property
    def reload_seconds(self) -> float:
        """The trust reload interval (the service's default when unset)."""
        return float(self.env.get("ATTEST_TRUST_RELOAD_SECONDS") or 10)


def _make_run() -> Configuration:
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None, "Makefile has no run target"
    words = shlex.split(recipe.group(1))
    env: dict[str, str] = {}
    # Leading NAME=value words are the recipe's environment; make's ``$${NAME:-default}`` is the default.
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        default = re.fullmatch(r"\$\$\{" + name + r":-(.*)\}", value)
        env[name] = default.group(1) if default else value
    assert words[0].endswith("/attest-service"), recipe.group(1)
    assert words[1] == "serve", recipe.group(1)
    assert "--workers" not in words  # the command's default below
    return Configuration("make run", env, DEFAULT_WORKERS)


def _image() -> Configuration:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    runtime = dockerfile.split(" AS runtime", 1)[1].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.+)$", runtime, re.MULTILINE):
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            if key.startswith(("ATTEST_", "PYTHON")):
                env[key] = value
    command = json.loads(re.findall(r"^CMD\s+(\[.+\])$", runtime, re.MULTILINE)[-1])
    assert command[0] == "serve", command
    assert "--workers" not in command, command
    return Configuration("image", env, DEFAULT_WORKERS)


def _chart(*, aia: bool | None = None) -> Configuration:
    chart = REPO_ROOT / "helm" / "attest-service"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    settings = dict(values["settings"])
    if aia is not None:
        settings["aiaFetch"] = aia
    env: dict[str, str] = {}
    depth = 0
    for line in (chart / "templates" / "configmap.yaml").read_text().splitlines():
        # Lines inside {{ if }} blocks depend on values the defaults leave off (a policy file) or on the
        # store, which the drill sets itself: only the unconditional settings are taken.
        depth += line.count("{{- if") - line.count("{{- end")
        if depth or "{{- " in line:
            continue
        templated = re.fullmatch(r'\s+(ATTEST_\w+): \{\{ (ternary "1" "0" )?\.Values\.settings\.(\w+) \| quote \}\}',
                                 line)
        literal = re.fullmatch(r"\s+(ATTEST_\w+): ([^{\s]+)", line)
        if templated is not None:
            value = settings[templated.group(3)]
            env[templated.group(1)] = ("1" if value else "0") if templated.group(2) else str(value)
        elif literal is not None:
            env[literal.group(1)] = literal.group(2)
    assert "ATTEST_TRUST_RELOAD_SECONDS" in env, env
    assert "ATTEST_AIA_FETCH" in env, env
    name = "chart" if aia is None else f"chart, aiaFetch={str(aia).lower()}"
    return Configuration(name, env, int(values["server"]["workers"]))


# --- the PKI and the load ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DrillPki:
    """The pinned root and issuing CA, the new CA that starts signing, and a leaf under each."""

    root: pki.CertifiedKey
    old_ca: pki.CertifiedKey
    new_ca: pki.CertifiedKey
    old_leaf: pki.CertifiedKey
    new_leaf: pki.CertifiedKey

    @classmethod
    def generate(cls, aia_url: str) -> DrillPki:
        """Around now; the new leaf names ``aia_url`` and then Microsoft's repository as caIssuers."""
        now = datetime.now(UTC)
        root, old_ca, old_leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
        new_ca = pki.make_intermediate(common_name=NEW_CA, key=pki.new_key("rsa"), issuer=root,
                                       not_before=now - timedelta(days=1), not_after=now + timedelta(days=400),
                                       serial=x509.random_serial_number())
        new_leaf = make_leaf(new_ca, old_leaf.private_key, now, ca_issuers=[aia_url, MICROSOFT_URL])  # type: ignore[arg-type]
        return cls(root=root, old_ca=old_ca, new_ca=new_ca, old_leaf=old_leaf, new_leaf=new_leaf)


def _body(leaf: pki.CertifiedKey) -> dict[str, object]:
    nonce = uuid.uuid4().hex
    created_on = datetime.now(UTC) - timedelta(seconds=5)
    content = pki.attested_content(nonce=nonce, vm_id=str(uuid.uuid4()), subscription_id="8a205152-0000-4000-8000-"
                                   "000000000001", sku="sku", plan=("", "", ""), license_type="",
                                   created_on=created_on, expires_on=created_on + pki.DOCUMENT_LIFETIME)
    signature = base64.b64encode(pki.sign_attested(content, signer=leaf)).decode()
    return {"document": {"encoding": "pkcs7", "signature": signature}, "nonce": nonce, "cloud": "public"}


@dataclass(frozen=True, slots=True)
class Sent:
    """One genuine document sent: when, under which CA, and the answer."""

    started: float
    finished: float
    rotated: bool
    status: int
    code: str | None


@dataclass
class LoadClient:
    """Sends genuine documents at a steady rate; after :meth:`rotate`, signed under the new CA."""

    service: ServiceProcess
    drill: DrillPki
    records: list[Sent] = field(default_factory=list)
    latest_new_document: bytes = b""
    rotated_at: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rotate(self) -> float:
        self.rotated_at = time.monotonic()
        return self.rotated_at

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        interval = 1.0 / RATE_PER_SECOND
        next_send = time.monotonic()
        while not self._stop.is_set():
            rotated = self.rotated_at is not None
            body = _body(self.drill.new_leaf if rotated else self.drill.old_leaf)
            started = time.monotonic()
            try:
                reply = self.service.post("/v1/verify", body)
                status, code = reply.status, reply.code
            except OSError as exc:
                status, code = 0, type(exc).__name__
            self.records.append(Sent(started, time.monotonic(), rotated, status, code))
            if rotated:
                self.latest_new_document = json.dumps(body["document"]).encode()
            next_send += interval
            self._stop.wait(max(0.0, next_send - time.monotonic()))


class DrillGunicorn(ServiceProcess):
    """gunicorn with the service's configuration module and ``drill_app``'s application (AIA via loopback)."""

    def start(self) -> ServiceProcess:
        """Start as :meth:`ServiceProcess.start` does, with the drill's application in place of the service's."""
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)
        env.update(self._env)
        argv = [sys.executable, "-m", "gunicorn", "--config", "python:attest_service.server.gunicorn_conf", "--bind",
                f"{self.host}:{self.port}", "--workers", str(self.workers), "tests.trust.drill_app:create_app()"]
        with self.log.open("ab") as output:
            self._process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self


def _metrics(service: ServiceProcess) -> str:
    connection = http.client.HTTPConnection(service.host, service.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _wait_for(what: str, probe: object, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"{what} did not show within {timeout:g} s")


# --- one run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """What one configuration's run measured (seconds are wall-clock, monotonic)."""

    configuration: str
    aia: bool
    reload_seconds: float
    sent_after_rotation: int
    refused: int
    codes: Mapping[str, int]
    refused_seconds: float
    signal_seconds: float
    command_seconds: float
    pickup_seconds: float
    log_line: str
    aia_fetched: float


def _run(config: Configuration, drill: DrillPki, server: CaServer, workdir: Path) -> Figures:
    workdir.mkdir(parents=True)
    pins = workdir / "pins"
    pki.write_pinned_dir(pins, "public", root=drill.root.certificate, intermediates=[drill.old_ca.certificate])
    env = {**config.env, "ATTEST_PINNED_CERTS": str(pins),
           "ATTEST_NONCE_STORE": f"sqlite:///{workdir / 'nonces.sqlite3'}", "ATTEST_STORE_TIMEOUT_SECONDS": "5"}
    service_type = ServiceProcess
    if config.aia:
        env[PORT_VARIABLE] = str(server.port)
        service_type = DrillGunicorn
    with service_type(env, workdir, workers=config.workers) as service:
        client = LoadClient(service, drill)
        client.start()
        try:
            time.sleep(WARM_UP_SECONDS)
            rotated = client.rotate()
            # The operator's signal: the metric, then the log line naming the issuer and its URL.
            label = NEW_CA if config.aia else "unproven"
            signalled = _wait_for("the unpinned issuer metric", lambda: _sample(
                _metrics(service), "attest_unpinned_issuer_total", f'issuer="{label}"') > 0, SIGNAL_TIMEOUT_SECONDS)
            # Not the AIA fallback's "fetched unpinned issuing CA" line: the one that names the caIssuers URLs.
            log_pattern = re.compile(rf"(?<!fetched )unpinned issuing CA 'CN={NEW_CA}[^\n]*")
            _wait_for("the log line", lambda: log_pattern.search(service.log_tail(200_000)), SIGNAL_TIMEOUT_SECONDS)
            match = log_pattern.search(service.log_tail(200_000))
            assert match is not None
            log_line = match.group(0)
            _wait_for("a document under the new CA", lambda: client.latest_new_document, SIGNAL_TIMEOUT_SECONDS)
            document = workdir / "document.json"
            document.write_bytes(client.latest_new_document)
            issuer = workdir / "issuer.crt"
            with urllib.request.urlopen(server.url(NEW_CA_PATH), timeout=5) as answer:
                issuer.write_bytes(answer.read())
            command_started = time.monotonic()
            completed = subprocess.run(
                [sys.executable, "-m", "attest_service", "certs", "add", "--cloud", "public", "--pinned-certs",
                 str(pins), "--from-document", str(document), "--issuer", str(issuer)],
                capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
            pinned_at = time.monotonic()
            assert completed.returncode == 0, completed.stdout + completed.stderr
            assert f"added: public: {NEW_CA}" in completed.stdout, completed.stdout
            time.sleep(config.reload_seconds + SETTLE_SECONDS)
        finally:
            client.stop()
        fetched = _sample(_metrics(service), "attest_aia_fetch_total", 'result="fetched"')
    after = [record for record in client.records if record.rotated]
    before = [record for record in client.records if not record.rotated]
    assert before, "no document was sent before the rotation"
    assert all(record.status == 200 for record in before), Counter(r.status for r in before)
    refused = [record for record in after if record.status != 200]
    # No refusal in the last second of load: every worker has taken the pin.
    assert all(record.started < after[-1].started - 1.0 for record in refused), "refusals went on to the end"
    last_refused = max((record.finished for record in refused), default=pinned_at)
    return Figures(
        configuration=config.name, aia=config.aia, reload_seconds=config.reload_seconds,
        sent_after_rotation=len(after), refused=len(refused),
        codes=dict(Counter(f"{record.status} {record.code}" for record in refused)),
        refused_seconds=(last_refused - refused[0].started) if refused else 0.0,
        signal_seconds=signalled - (refused[0].finished if refused else rotated),
        command_seconds=pinned_at - command_started,
        pickup_seconds=max(0.0, last_refused - pinned_at), log_line=log_line, aia_fetched=fetched)


def test_rotation_drill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configurations = [_make_run(), _image(), _chart(), _chart(aia=True)]
    with ca_server() as server:
        drill = DrillPki.generate(server.url(NEW_CA_PATH))
        # Azure publishes a new issuing CA at the caIssuers URL its leaves name.
        server.publish(NEW_CA_PATH, drill.new_ca.certificate.public_bytes(serialization.Encoding.DER))
        with ThreadPoolExecutor(max_workers=len(configurations)) as pool:
            # The runs are independent (own service, pins and store); in parallel the drill takes one run's time.
            futures = [pool.submit(_run, config, drill, server, tmp_path / f"run-{index}")
                       for index, config in enumerate(configurations)]
            figures = [future.result() for future in futures]
    with capsys.disabled():
        sys.stdout.write(f"\n\nrotation drill (genuine documents at {RATE_PER_SECOND:g}/s; the operator acts on "
                         "the first signal)\n")
        header = ("configuration", "AIA", "reload s", "sent", "refused", "refused for s", "signal s", "command s",
                  "pickup s")
        rows = [header, *((f.configuration, "on" if f.aia else "off", f"{f.reload_seconds:g}",
                           str(f.sent_after_rotation), str(f.refused), f"{f.refused_seconds:.1f}",
                           f"{f.signal_seconds:.1f}", f"{f.command_seconds:.1f}", f"{f.pickup_seconds:.1f}")
                          for f in figures)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            sys.stdout.write("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) + "\n")
        for f in figures:
            sys.stdout.write(f"{f.configuration}: refusals {f.codes or 'none'}; AIA fetches {f.aia_fetched:g}; "
                             f"log: {f.log_line}\n")
    for f in figures:
        assert f.pickup_seconds <= PICKUP_LIMIT_SECONDS, f
        assert NEW_CA in f.log_line, f.log_line
        assert MICROSOFT_URL in f.log_line, f.log_line
        if f.aia:
            assert f.refused == 0, f
            assert f.aia_fetched >= 1, f
        else:
            assert f.refused > 0, f  # the rotation really was felt: the drill measures something
            assert set(f.codes) == {"422 untrusted_chain"}, f.codes
            assert f.pickup_seconds <= f.reload_seconds + SETTLE_SECONDS, f
