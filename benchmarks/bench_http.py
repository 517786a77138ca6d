"""HTTP throughput and latency of ``POST /v1/verify`` beside a bare Flask echo, in one run, on the shipped settings.

Three servers run side by side on loopback:

* **verify**: ``attest-service serve`` exactly as shipped (its default worker class and count), on a real
  ``redis-server`` started here on a free port, with one API-key caller whose rate budget is raised so that
  the limit is not what is measured; access log and metrics as shipped; attestation results off (what a
  shared store without ``ATTEST_RESULT_KEYS`` gives);
* **verify(results)**: the same with attestation results on (``ATTEST_RESULT_KEYS``: one P-256 key), so
  that every answer also carries a signed EAR token: the cost of results, side by side with ``verify``;
* **echo(sync)**: a bare Flask app (``benchmarks/echo_app.py``) under gunicorn's defaults, 2 sync workers;
* **echo(gevent)**: the same app under the service's gunicorn configuration (gevent workers, JSON access log).

Every request carries a distinct valid document (RSA-2048, Azure's shape, each with its own nonce; signed
here at start-up with a generated test PKI), so each one is a full verification and a first acceptance. Redis
is emptied before every verify run, so the same documents serve every run and still are first submissions.

Figures (best of ``--rounds`` interleaved rounds, each round verify, echo(sync), echo(gevent)):

1. capacity: ``wrk`` with 16 keep-alive connections for ``--duration`` seconds; verify/echo ratios (the target
   is against echo(sync), gunicorn's defaults; the ratio to echo(gevent) is printed beside it);
2. latency under load: while wrk saturates a server, a separate open-loop client of our own
   (``benchmarks/openloop.py``) sends one request every 20 ms; p50, p99, p99.9 and max, counted from each
   request's scheduled instant (wrk's own latency figures suffer from coordinated omission);
3. latency at half capacity: the open-loop client alone at half of each server's measured capacity;
4. throughput at 1 and 4 workers (2 come from the rounds), Redis CPU and commands per verification
   (``/proc/<pid>/stat``, ``INFO commandstats``), service CPU per verification, and how the connections were
   spread over the workers;
5. CPU per request: user plus system time of each server's processes (gunicorn master and workers, and for
   verify the Redis server too) per 2xx answer, over all rounds, and echo's CPU per request over verify's;
   results on over results off, in CPU per request and in capacity (the target: at most 10 % more CPU).

On a 2-core machine the load generator, the client and Redis share the cores with the servers: the ratio
is the figure to compare, not the absolute rates. Of the two ratios, the CPU one holds best on a shared or
virtual machine: others' work and the hypervisor's steal delay the servers (lowering their rates) but do not
add to the CPU time each request takes. Prints figures; asserts nothing. Linux only (``/proc``).

Run: ``python benchmarks/bench_http.py [--documents N] [--duration S] [--rounds N]`` (needs redis-server, wrk).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import targets  # noqa: E402
from openloop import Result, distribution, percentile, post_request, run_paced  # noqa: E402

from attest_service.cli import serve as serve_command  # noqa: E402
from attest_service.imds import pki  # noqa: E402
from attest_service.results import write_new_key  # noqa: E402
from attest_service.server import gunicorn_conf, serve  # noqa: E402
from attest_service.verify.pkcs7 import parse_signed_data  # noqa: E402
from tests.support.redis_server import RedisServer, free_port, redis_server  # noqa: E402

LOOPBACK: Final = "127.0.0.1"
PATH: Final = "/v1/verify"
#: The shipped worker count and class: what ``attest-service serve`` runs without options.
SHIPPED_WORKERS: Final = serve_command.DEFAULT_WORKERS
ECHO_WORKERS: Final = 2
WRK_THREADS: Final = 2
WRK_CONNECTIONS: Final = 16
#: The latency probe under load: one request every 20 ms.
PROBE_RATE: Final = 50.0
#: Documents kept out of wrk's share for the probe that runs beside it.
PROBE_RESERVE: Final = 2000
HEALTH_TIMEOUT_SECONDS: Final = 30.0
WARMUP_SECONDS: Final = 2
#: Seconds given to the requests still in a worker when wrk stops (wrk drops them, the server finishes them),
#: so that their nonces are recorded before Redis is emptied rather than after, as replays for the next run.
DRAIN_SECONDS: Final = 1.0
CLIENT_ID: Final = "bench"
API_KEY: Final = "bench-key-" + "0" * 22
#: The rate budget of the one caller, per minute (the settings' maximum): far above any rate reached here.
RATE_LIMIT_PER_MINUTE: Final = 1_000_000
SUBSCRIPTION: Final = "8a205152-0000-4000-8000-000000000001"
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

_WRK_SCRIPT: Final = """
local bodies = {}
local position = 0
local counter = 0
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(key)s"}
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  for line in io.lines("%(prefix)s" .. id .. ".txt") do bodies[#bodies + 1] = line end
end
function request()
  position = position + 1
  if position > #bodies then position = 1 end
  return wrk.format("POST", "%(path)s", headers, bodies[position])
end
"""


# --- documents ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Template:
    """One signed document, where its content and signature sit, and the key that signed it."""

    der: bytes
    content_at: int
    signature_at: int
    key: rsa.RSAPrivateKey
    created: datetime


# Set in the parent before the signing processes fork; read in them.
_template: _Template | None = None


def _body(signature_der: bytes, nonce: str) -> bytes:
    document = {"encoding": "pkcs7", "signature": base64.b64encode(signature_der).decode()}
    return json.dumps({"document": document, "nonce": nonce}).encode()


def _content(nonce: str, vm_id: str, created: datetime) -> bytes:
    return pki.attested_content(nonce=nonce, vm_id=vm_id, subscription_id=SUBSCRIPTION, sku="20_04-lts-gen2",
                                plan=("", "", ""), license_type="", created_on=created,
                                expires_on=created + pki.DOCUMENT_LIFETIME)


def _nonce(index: int) -> str:
    # Fixed length (18 characters), so every content has the template's length.
    return f"bench{index:07d}{secrets.token_hex(3)}"


def _sign_range(bounds: tuple[int, int]) -> list[bytes]:
    """Bodies ``start..stop``: the template document with another content and its own signature spliced in."""
    template = _template
    if template is None:
        raise RuntimeError("no template document to sign from")
    bodies = []
    for index in range(*bounds):
        nonce = _nonce(index)
        content = _content(nonce, str(uuid.uuid4()), template.created)
        signature = template.key.sign(content, padding.PKCS1v15(), hashes.SHA256())
        document = bytearray(template.der)
        document[template.content_at:template.content_at + len(content)] = content
        document[template.signature_at:template.signature_at + len(signature)] = signature
        bodies.append(_body(bytes(document), nonce))
    return bodies


def make_documents(count: int, pinned: Path) -> list[bytes]:
    """``count`` distinct valid ``POST /v1/verify`` bodies under a fresh test PKI pinned in ``pinned``.

    One document is built with the PKI's own signer (:func:`pki.sign_attested`); the others are that DER
    with a different content of the same length and that content's RSA signature in place, which is the
    same document the signer would build, made in a third of the time (the ASN.1 assembly is the slow part).
    """
    global _template  # noqa: PLW0603 - handed to the forked signing processes
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    if not isinstance(leaf.private_key, rsa.RSAPrivateKey):
        raise TypeError("the test PKI's signer is not RSA")
    created = now - timedelta(seconds=30)
    content = _content(_nonce(0), str(uuid.uuid4()), created)
    der = pki.sign_attested(content, signer=leaf)
    signature = parse_signed_data(der).signature
    if der.count(content) != 1 or der.count(signature) != 1:
        raise RuntimeError("the template document does not hold its content and signature exactly once")
    _template = _Template(der=der, content_at=der.index(content), signature_at=der.index(signature),
                          key=leaf.private_key, created=created)
    # The splice must rebuild the template from its own content (PKCS#1 v1.5 signatures are deterministic).
    document = bytearray(der)
    document[_template.signature_at:_template.signature_at + len(signature)] = leaf.private_key.sign(
        content, padding.PKCS1v15(), hashes.SHA256())
    if bytes(document) != der:
        raise RuntimeError("splicing a signature into the template does not reproduce it")
    processes = max(1, len(os.sched_getaffinity(0)))
    step = max(1, count // (processes * 8))
    chunks = [(start, min(count, start + step)) for start in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return [body for part in pool.map(_sign_range, chunks) for body in part]


# --- servers --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (0 when it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return 0.0


def schedstat_seconds(pid: int) -> tuple[float, float]:
    """Seconds the threads of ``pid`` have run on a core and spent runnable waiting for one (schedstat)."""
    run = wait = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "schedstat").read_text().split()
                run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


def _machine_fields() -> list[int]:
    # /proc/stat's first line: user nice system idle iowait irq softirq steal (guest times are within user).
    return [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (``/proc/stat``: all but idle, iowait, steal)."""
    fields = _machine_fields()
    return (sum(fields[:7]) - fields[3] - fields[4]) / _CLOCK_TICKS


def stolen_seconds() -> float:
    """CPU seconds the hypervisor ran something else while this machine's cores wanted to run (steal)."""
    return _machine_fields()[7] / _CLOCK_TICKS


def own_seconds() -> float:
    """CPU seconds of this process and of its reaped children (wrk) so far."""
    usage = os.times()
    return usage.user + usage.system + usage.children_user + usage.children_system


class OtherLoad:
    """CPU the rest of the machine (other users' work) took while a measurement ran, in cores.

    Busy time of the whole machine minus that of the processes measured here: the servers' workers,
    redis-server, wrk and this process. On a shared machine it tells which runs were disturbed; so does the
    time the hypervisor took from this virtual machine's cores (steal), which stalls every process at once.
    The workers' time runnable but waiting for a core, beside their time running, tells how much of their
    latency is a queue for the cores rather than their own work.
    """

    def __init__(self, pids: Sequence[int], workers: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.workers = list(workers)
        self.started = time.monotonic()
        self.machine = machine_busy_seconds()
        self.stolen = stolen_seconds()
        self.ours = self._ours()
        self.scheduled = self._scheduled()

    def _scheduled(self) -> tuple[float, float]:
        times = [schedstat_seconds(pid) for pid in self.workers]
        return sum(run for run, _ in times), sum(wait for _, wait in times)

    def _ours(self) -> float:
        return own_seconds() + sum(cpu_seconds(pid) for pid in self.pids)

    def cores(self) -> float:
        """Average cores used by other processes since construction."""
        elapsed = time.monotonic() - self.started
        other = (machine_busy_seconds() - self.machine) - (self._ours() - self.ours)
        return max(0.0, other / elapsed) if elapsed > 0 else 0.0

    def stolen_cores(self) -> float:
        """Average cores the hypervisor took from this machine since construction."""
        elapsed = time.monotonic() - self.started
        return (stolen_seconds() - self.stolen) / elapsed if elapsed > 0 else 0.0

    def waited_share(self) -> float:
        """The workers' seconds waiting for a core per second they ran, since construction (nan: no workers)."""
        run, wait = (now - before for now, before in zip(self._scheduled(), self.scheduled, strict=True))
        return wait / run if run > 0 else float("nan")

    def describe(self) -> str:
        """All three, for a figure's line."""
        text = f"other load {self.cores():.2f} cores, host steal {self.stolen_cores():.2f} cores"
        if self.workers:
            text += f"; workers waited for a core {self.waited_share():.0%} of their run time"
        return text


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the established TCP connections whose local end is ``port`` (the server side)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                    inodes.add(fields[9])
    return inodes


@dataclass
class Server:
    """A running gunicorn master (and its workers) on ``port``."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[int]:
        """The master's children."""
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
            return sorted(int(pid) for pid in text.split())
        return []

    def cpu(self) -> float:
        """CPU seconds of the workers so far."""
        return sum(cpu_seconds(pid) for pid in self.workers())

    def all_cpu(self) -> float:
        """CPU seconds of the master and the workers so far: every process of this server."""
        return cpu_seconds(self.process.pid) + self.cpu()

    def connections(self) -> tuple[list[int], int]:
        """Client connections held by each worker, and those established but accepted by none (queued)."""
        inodes = _socket_inodes(self.port)
        held = []
        for pid in self.workers():
            count = 0
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = str(fd.readlink())
                        if target.startswith("socket:[") and target[8:-1] in inodes:
                            count += 1
            held.append(count)
        # Both ends of a loopback connection are listed; only the server end has the server's local port.
        return held, max(0, len(inodes) - sum(held))


@contextlib.contextmanager
def running(name: str, argv: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[Server]:
    """Start ``argv`` in its own session, wait for ``/healthz``, stop the whole group on exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.1)
        yield Server(name, port, process, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=25)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def base_env(gunicorn_args: str) -> dict[str, str]:
    """This environment without ``ATTEST_*`` settings (shipped defaults), plus extra gunicorn options if any."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("ATTEST_") and key != "GUNICORN_CMD_ARGS"}
    if gunicorn_args:
        env["GUNICORN_CMD_ARGS"] = gunicorn_args
    return env


def result_keys(workdir: Path) -> Path:
    """A result key directory with one P-256 key (made once per run)."""
    directory = workdir / "result-keys"
    if not directory.is_dir():
        write_new_key(directory, "ES256")
    return directory


def service(workdir: Path, redis: RedisServer, workers: int | None,
            gunicorn_args: str, *, results: bool = False) -> contextlib.AbstractContextManager[Server]:
    """``attest-service serve`` as shipped; ``workers`` None means the shipped count (no option given).

    ``results``: attestation results on, signed with a P-256 key (else off, as on a shared store by default).
    """
    port = free_port()
    metrics = workdir / f"metrics-{port}"
    metrics.mkdir()
    env = {**base_env(gunicorn_args), "PROMETHEUS_MULTIPROC_DIR": str(metrics),
           "ATTEST_PINNED_CERTS": str(workdir / "pinned"), "ATTEST_NONCE_STORE": redis.url,
           "ATTEST_API_KEYS": f"{CLIENT_ID}:{hashlib.sha256(API_KEY.encode()).hexdigest()}",
           "ATTEST_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE),
           "ATTEST_RESULT_KEYS": str(result_keys(workdir)) if results else "off"}
    argv = [sys.executable, "-m", "attest_service", "serve", "--bind", f"{LOOPBACK}:{port}"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    name = ("verify(results)" if results else "verify") if workers is None else f"verify({workers} workers)"
    return running(name, argv, env, port, workdir / f"service-{port}.log")


def echo(workdir: Path, kind: str, gunicorn_args: str) -> contextlib.AbstractContextManager[Server]:
    """The echo app under gunicorn's defaults (``sync``) or under the service's configuration (``gevent``)."""
    port = free_port()
    config = [] if kind == "sync" else ["--config", serve.GUNICORN_CONFIG]
    argv = [sys.executable, "-m", "gunicorn", *config, "--bind", f"{LOOPBACK}:{port}", "--workers",
            str(ECHO_WORKERS), "--pythonpath", str(BENCH_DIR), "echo_app:create_app()"]
    env = base_env(gunicorn_args)
    if kind != "sync":
        metrics = workdir / f"metrics-{port}"
        metrics.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    return running(f"echo({kind})", argv, env, port, workdir / f"echo-{kind}-{port}.log")


# --- load -----------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """wrk's count and rate of answers, its non-2xx count and socket errors."""

    requests: int
    rate: float
    non_2xx: int
    socket_errors: str


def write_wrk_bodies(bodies: Sequence[bytes], workdir: Path) -> Path:
    """One body file per wrk thread (each thread walks its own share); returns the common prefix."""
    prefix = workdir / "wrk-bodies-"
    for thread in range(WRK_THREADS):
        Path(f"{prefix}{thread}.txt").write_bytes(b"\n".join(bodies[thread::WRK_THREADS]) + b"\n")
    script = workdir / "wrk.lua"
    script.write_text(_WRK_SCRIPT % {"prefix": prefix, "path": PATH, "key": API_KEY})
    return script


def start_wrk(port: int, seconds: float, script: Path) -> subprocess.Popen[str]:
    """wrk against ``port`` for ``seconds``, running in the background."""
    return subprocess.Popen(["wrk", "-t", str(WRK_THREADS), "-c", str(WRK_CONNECTIONS), "-d", f"{int(seconds)}s",
                             "-s", str(script), f"http://{LOOPBACK}:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_wrk(process: subprocess.Popen[str]) -> WrkResult:
    """Wait for wrk and read its summary."""
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{output}")
    requests = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return WrkResult(int(requests.group(1)) if requests else 0, float(rate.group(1)) if rate else 0.0,
                     int(non_2xx.group(1)) if non_2xx else 0, errors.group(1).strip() if errors else "none")


@dataclass
class Saturation:
    """One capacity run: wrk's figures, the probe's latencies, CPU and Redis work, the connection spread."""

    server: str
    wrk: WrkResult
    probe: Result
    worker_cpu: float
    redis_cpu: float = 0.0
    #: CPU seconds of the master and the workers (the workers' alone are ``worker_cpu``).
    server_cpu: float = 0.0
    redis_commands: dict[str, int] = field(default_factory=dict)
    spread: tuple[list[int], int] = ([], 0)
    #: What else took the machine's CPU meanwhile (OtherLoad.describe).
    disturbance: str = ""

    @property
    def good(self) -> int:
        """2xx answers, wrk's and the probe's."""
        return self.wrk.requests - self.wrk.non_2xx + self.probe.answered - self.probe.failures

    @property
    def cpu(self) -> float:
        """CPU seconds the request path took: the server's processes, and Redis for verify (0 for an echo)."""
        return self.server_cpu + self.redis_cpu


class Bench:
    """The measurements, with the Redis server, the documents and the wrk script they share."""

    def __init__(self, redis: RedisServer, bodies: list[bytes], workdir: Path) -> None:
        self.redis = redis
        self.client = redis.client()
        self.redis_pid = int(self.client.info("server")["process_id"])
        self.bodies = bodies
        self.requests = [post_request(LOOPBACK, 0, PATH, body, {"Authorization": f"Bearer {API_KEY}"})
                         for body in bodies]
        self.probe_requests = self.requests[-PROBE_RESERVE:]
        self.script = write_wrk_bodies(bodies[:-PROBE_RESERVE], workdir)

    def fresh(self) -> None:
        """Forget every nonce and rate counter, so that every document is a first submission again."""
        time.sleep(DRAIN_SECONDS)
        self.client.flushall()

    def warm_up(self, server: Server) -> None:
        """Imports, connection pools, script loading and the chain cache, before anything is measured."""
        finish_wrk(start_wrk(server.port, WARMUP_SECONDS, self.script))
        self.fresh()

    def saturate(self, server: Server, seconds: float, *, probe: bool = True) -> Saturation:
        """wrk for ``seconds``; with ``probe``, the paced probe beside it from the second second on."""
        self.fresh()
        self.client.config_resetstat()
        redis_before, cpu_before, all_before = cpu_seconds(self.redis_pid), server.cpu(), server.all_cpu()
        other = OtherLoad([*server.workers(), self.redis_pid], server.workers())
        spread: list[tuple[list[int], int]] = []
        sampler = threading.Timer(seconds / 2, lambda: spread.append(server.connections()))
        wrk = start_wrk(server.port, seconds, self.script)
        sampler.start()
        result = Result()
        if probe:
            time.sleep(1.0)
            result = run_paced(LOOPBACK, server.port, self.probe_requests, rate=PROBE_RATE, seconds=seconds - 2.5,
                               connections=2, max_connections=16)
        load = finish_wrk(wrk)
        sampler.join()
        worker_cpu = server.cpu() - cpu_before
        server_cpu = server.all_cpu() - all_before
        # Redis serves the service alone; the echoes never touch it, so its CPU is charged to verify only.
        redis_cpu = cpu_seconds(self.redis_pid) - redis_before if server.name.startswith("verify") else 0.0
        disturbance = other.describe()
        stats = self.client.info("commandstats")
        commands = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
                    if not name.startswith(("cmdstat_config", "cmdstat_info", "cmdstat_flushall"))}
        return Saturation(server.name, load, result, worker_cpu, redis_cpu, server_cpu, commands,
                          spread[0] if spread else ([], 0), disturbance)

    def paced(self, server: Server, rate: float, seconds: float) -> tuple[Result, tuple[list[int], int], str]:
        """The open-loop client alone at ``rate`` for ``seconds``; the connection spread half-way; other load."""
        self.fresh()
        other = OtherLoad([*server.workers(), self.redis_pid], server.workers())
        spread: list[tuple[list[int], int]] = []
        sampler = threading.Timer(seconds / 2, lambda: spread.append(server.connections()))
        sampler.start()
        client_before = time.thread_time()  # the client runs in this thread; the sampler in another
        result = run_paced(LOOPBACK, server.port, self.requests, rate=rate, seconds=seconds,
                           connections=WRK_CONNECTIONS, max_connections=64)
        client_cpu = time.thread_time() - client_before
        sampler.join()
        disturbance = (f"client CPU {client_cpu / max(result.scheduled, 1) * 1e6:.0f} us/request; "
                       f"{other.describe()}")
        return result, spread[0] if spread else ([], 0), disturbance


def describe_spread(spread: tuple[list[int], int]) -> str:
    held, queued = spread
    text = "/".join(str(count) for count in held) or "?"
    return f"{text} (+{queued} queued)" if queued else text


def print_saturation(run: Saturation, verify: bool) -> None:
    line = (f"  {run.server:13s} {run.wrk.rate:8,.0f}/s  wrk non-2xx {run.wrk.non_2xx}, socket errors "
            f"{run.wrk.socket_errors}; connections per worker {describe_spread(run.spread)}; "
            f"worker CPU {run.worker_cpu / max(run.good, 1) * 1e3:.3f} ms/request, "
            f"CPU per request {run.cpu / max(run.good, 1) * 1e6:.0f} us; "
            f"{run.disturbance}")
    print(line)
    if run.probe.answered:
        print(f"  {'':13s} probe every 20 ms: {distribution(run.probe.latencies_ms)}, non-2xx {run.probe.failures}")
    if verify:
        calls = sum(run.redis_commands.values())
        detail = ", ".join(f"{name} {count / max(run.good, 1):.2f}"
                           for name, count in sorted(run.redis_commands.items()))
        print(f"  {'':13s} Redis: {run.redis_cpu / max(run.good, 1) * 1e6:.1f} us CPU and "
              f"{calls / max(run.good, 1):.2f} commands per verification ({detail})")
        if run.wrk.non_2xx:
            print(f"  {'':13s} WARNING: {run.wrk.non_2xx} non-2xx answers: more documents are needed (--documents)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=48_000, help="distinct documents (default 48000)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per capacity run (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved capacity rounds (default 2)")
    parser.add_argument("--half-duration", type=float, default=10.0, help="seconds per half-capacity run")
    parser.add_argument("--scale-duration", type=float, default=8.0, help="seconds per 1- and 4-worker run")
    parser.add_argument("--scale", default="1,4", help="worker counts to measure besides the shipped one ('' = none)")
    parser.add_argument("--servers", default="verify,results,sync,gevent",
                        help="which of verify, results (verify with attestation results on), sync, gevent to run")
    parser.add_argument("--service-gunicorn-args", default="", help="extra gunicorn options for the service only "
                        "(GUNICORN_CMD_ARGS), to try a setting; the figures are then not the shipped ones")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn options for every server")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk; `make bench` installs it)", file=sys.stderr)
        return 2
    kinds = [kind for kind in args.servers.split(",") if kind]
    service_args = " ".join(filter(None, [args.gunicorn_args, args.service_gunicorn_args]))
    print(f"cpus: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}; service: "
          f"{SHIPPED_WORKERS} {gunicorn_conf.worker_class} workers (shipped) "
          f"{'with ' + repr(service_args) + ' ' if service_args else ''}on Redis; echo: {ECHO_WORKERS} workers; "
          f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-http-") as name, redis_server(Path(name) / "redis") as redis:
        workdir = Path(name)
        started = time.monotonic()
        bodies = make_documents(args.documents, workdir / "pinned")
        print(f"signed {len(bodies):,} distinct documents in {time.monotonic() - started:.1f} s", flush=True)
        bench = Bench(redis, bodies, workdir)
        best: dict[str, Saturation] = {}
        rounds: dict[str, list[Saturation]] = {}
        probes: dict[str, list[float]] = {}
        half: dict[str, tuple[float, Result]] = {}
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            for kind in kinds:
                if kind in ("verify", "results"):
                    servers[kind] = stack.enter_context(service(workdir, redis, None, service_args,
                                                                results=kind == "results"))
                else:
                    servers[kind] = stack.enter_context(echo(workdir, kind, args.gunicorn_args))
                bench.warm_up(servers[kind])
            for round_number in range(1, args.rounds + 1):
                print(f"round {round_number} (capacity over {args.duration:.0f} s, wrk; probe beside it):", flush=True)
                for kind, server in servers.items():
                    run = bench.saturate(server, args.duration)
                    print_saturation(run, kind in ("verify", "results"))
                    sys.stdout.flush()
                    probes.setdefault(kind, []).extend(run.probe.latencies_ms)
                    rounds.setdefault(kind, []).append(run)
                    if kind not in best or run.wrk.rate > best[kind].wrk.rate:
                        best[kind] = run
            if args.half_duration > 0:
                print(f"half capacity (open-loop client alone, {WRK_CONNECTIONS} connections, "
                      f"{args.half_duration:.0f} s):", flush=True)
                for kind, server in servers.items():
                    rate = best[kind].wrk.rate / 2
                    result, spread, disturbance = bench.paced(server, rate, args.half_duration)
                    half[kind] = (rate, result)
                    print(f"  {server.name:13s} at {rate:6,.0f}/s: {distribution(result.latencies_ms)}, non-2xx "
                          f"{result.failures}", flush=True)
                    print(f"  {'':13s} client late p99 {percentile(result.late_ms, 0.99):.2f} ms, waited for a "
                          f"connection p99 {percentile(result.send_lag_ms, 0.99):.2f} ms, "
                          f"{result.connections_opened} connections opened; connections per worker "
                          f"{describe_spread(spread)}; {disturbance}", flush=True)
        scaling: dict[int, Saturation] = {}
        if "verify" in kinds and args.scale:
            print(f"throughput by workers (verify, {args.scale_duration:.0f} s each):", flush=True)
            for workers in (int(item) for item in args.scale.split(",")):
                with service(workdir, redis, workers, service_args) as server:
                    bench.warm_up(server)
                    scaling[workers] = bench.saturate(server, args.scale_duration, probe=False)
                    print_saturation(scaling[workers], verify=True)
                    sys.stdout.flush()

    print_figures(best, probes, half, scaling, rounds=args.rounds)
    print_cpu_figures(rounds)
    return 0


@dataclass(frozen=True)
class CpuPerRequest:
    """CPU seconds per 2xx answer of one server over all its capacity rounds, with the parts they come from."""

    server: float
    redis: float
    answers: int

    @classmethod
    def of(cls, runs: Sequence[Saturation]) -> CpuPerRequest:
        """Totals over ``runs``: a longer run weighs more, as it holds more requests."""
        answers = max(1, sum(run.good for run in runs))
        return cls(sum(run.server_cpu for run in runs) / answers, sum(run.redis_cpu for run in runs) / answers,
                   answers)

    @property
    def total(self) -> float:
        """CPU seconds per request, server and Redis."""
        return self.server + self.redis


def print_cpu_figures(rounds: dict[str, list[Saturation]]) -> None:
    """CPU per request of each server and echo's over verify's: how much of a core's work verify leaves.

    The ratio reads like the throughput ratio (1.0 would be a verification as cheap as an echo), but it counts
    CPU time spent rather than requests per wall-clock second, so a busy neighbour or the hypervisor's steal,
    which slow every server, change it far less.
    """
    if not rounds:
        return
    cpu = {kind: CpuPerRequest.of(runs) for kind, runs in rounds.items()}
    print("\nCPU per request (user + system, all rounds; verify: service processes + Redis):")
    for kind, figure in cpu.items():
        parts = f" (service {figure.server * 1e6:.0f} us + Redis {figure.redis * 1e6:.0f} us)" if figure.redis else ""
        print(f"  {rounds[kind][0].server:13s} {figure.total * 1e6:8.0f} us{parts} over {figure.answers:,} answers")
    verify = cpu.get("verify")
    if verify is None:
        return
    results = cpu.get("results")
    if results is not None:
        rates = {kind: max(run.wrk.rate for run in rounds[kind]) for kind in ("verify", "results")}
        print(targets.RESULTS_CPU_RATIO.line(results.total / verify.total, digits=3,
                                             note=f"({results.total * 1e6:.0f} us over {verify.total * 1e6:.0f} us "
                                                  f"per request: signing an EAR token costs "
                                                  f"{(results.total - verify.total) * 1e6:.0f} us)"))
        print(f"{'capacity results on/off:':<34} {rates['results'] / rates['verify']:>10.3f}   "
              f"({rates['results']:,.0f}/s over {rates['verify']:,.0f}/s, best rounds)")
    for kind in ("sync", "gevent"):
        if kind in cpu:
            print(f"{'CPU ratio echo(' + kind + ')/verify:':<34} {cpu[kind].total / verify.total:>10.2f}   "
                  f"echo's CPU per request over verify's")


def print_figures(best: dict[str, Saturation], probes: dict[str, list[float]], half: dict[str, tuple[float, Result]],
                  scaling: dict[int, Saturation], *, rounds: int) -> None:
    """The issue's figures (a)-(c) beside their targets, and the supporting ones."""
    print(f"\nfigures (capacity: best of {rounds} interleaved rounds; latency: probe samples of all rounds):")
    verify = best.get("verify")
    if verify is not None:
        if "sync" in best:
            print(targets.named(targets.RATIO_TO_ECHO, "verify/echo(sync) ratio").line(
                verify.wrk.rate / best["sync"].wrk.rate,
                note=f"({verify.wrk.rate:,.0f}/s over {best['sync'].wrk.rate:,.0f}/s)"))
        if "gevent" in best:
            # The target is set against gunicorn's default (sync) workers; this ratio is printed beside it.
            print(f"{'verify/echo(gevent) ratio:':<34} {verify.wrk.rate / best['gevent'].wrk.rate:>10.2f}   "
                  f"no target: the one above is against echo(sync)   "
                  f"({verify.wrk.rate:,.0f}/s over {best['gevent'].wrk.rate:,.0f}/s)")
        samples = probes.get("verify", [])
        echoes = "; ".join(f"echo({kind}) p99 {percentile(probes[kind], 0.99):.1f} ms, max {max(probes[kind]):.1f} ms"
                           for kind in ("sync", "gevent") if probes.get(kind))
        if samples:
            print(targets.P99_UNDER_LOAD_MS.line(percentile(samples, 0.99), digits=1,
                                                 note=f"(p50 {percentile(samples, 0.5):.1f} ms, p99.9 "
                                                      f"{percentile(samples, 0.999):.1f} ms; {echoes})"))
            print(targets.MAX_UNDER_LOAD_MS.line(max(samples), digits=1, note=f"({len(samples)} samples)"))
        if "verify" in half:
            rate, result = half["verify"]
            others = "; ".join(f"echo({kind}) at {half[kind][0]:,.0f}/s p99 "
                               f"{percentile(half[kind][1].latencies_ms, 0.99):.1f} ms"
                               for kind in ("sync", "gevent") if kind in half)
            print(targets.P99_AT_HALF_MS.line(percentile(result.latencies_ms, 0.99), digits=1,
                                              note=f"(at {rate:,.0f}/s; {others})"))
        if scaling:
            rates = {**{workers: run.wrk.rate for workers, run in scaling.items()}, SHIPPED_WORKERS: verify.wrk.rate}
            redis = {**{workers: run.redis_cpu / max(run.good, 1) for workers, run in scaling.items()},
                     SHIPPED_WORKERS: verify.redis_cpu / max(verify.good, 1)}
            print("verify throughput by workers:      " + ", ".join(
                f"{workers}: {rates[workers]:,.0f}/s" for workers in sorted(rates)))
            print("Redis CPU per verification:        " + ", ".join(
                f"{workers} workers: {redis[workers] * 1e6:.1f} us" for workers in sorted(redis)))


if __name__ == "__main__":
    raise SystemExit(main())
