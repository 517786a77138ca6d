"""Real ``redis-server`` processes on free loopback ports, for integration tests.

Nothing here talks to a system Redis: every server is a child process bound to 127.0.0.1 on a port
chosen at start, with persistence off and its files in a private directory. Three shapes are offered,
each as a context manager that always stops what it started::

    with redis_server() as server:            # one standalone server
        server.url                            # "redis://127.0.0.1:PORT/0"
        server.stop(); server.start()         # same port again (data is not kept)
        server.restart()
        with server.frozen():                 # SIGSTOP ... SIGCONT: a server that accepts but never answers
            ...

    with redis_cluster() as cluster:          # three masters, all 16384 slots assigned
        cluster.url                           # "redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"
        cluster.nodes[0].stop()

    with redis_cluster(replicas=1) as cluster:  # three masters, each with a replica in sync
        primary, replica = next(iter(cluster.topology().items()))
        primary.kill(); cluster.wait_promoted(replica)

    with redis_server() as master, redis_sentinel(master) as sentinel:
        sentinel.url                          # "redis+sentinel://127.0.0.1:SPORT/attest"

``redis_available()`` tells whether the binaries exist; tests mark themselves with
``tests.support.tools.requires_redis`` instead, which skips or (under CI) fails. The binaries are
``redis-server`` and ``redis-cli`` from ``PATH``, or the paths in ``ATTEST_REDIS_SERVER`` / ``ATTEST_REDIS_CLI``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import tools

LOOPBACK: Final = "127.0.0.1"
#: How long a server may take to answer PING after being started (seconds).
STARTUP_TIMEOUT_SECONDS: Final = 10.0
#: How long a server may take to exit after SIGTERM before it is killed (seconds).
SHUTDOWN_TIMEOUT_SECONDS: Final = 5.0
#: How long a fresh cluster may take to report ``cluster_state:ok`` on every node (seconds).
CLUSTER_CONVERGE_TIMEOUT_SECONDS: Final = 15.0
#: cluster-node-timeout of test clusters, in milliseconds: a stopped master is declared failed after about this.
CLUSTER_NODE_TIMEOUT_MS: Final = 1000
#: Attempts at finding a free port before giving up: another process may take the port we picked.
PORT_ATTEMPTS: Final = 5
#: Sentinel service name used by :func:`redis_sentinel`.
SENTINEL_SERVICE: Final = "attest"
_POLL_SECONDS: Final = 0.02


def redis_server_binary() -> str | None:
    """Path of ``redis-server``, or ``None`` when it is not installed."""
    return tools.find("redis-server")


def redis_cli_binary() -> str | None:
    """Path of ``redis-cli``, or ``None`` when it is not installed."""
    return tools.find("redis-cli")


def redis_available() -> bool:
    """Whether both ``redis-server`` and ``redis-cli`` are installed."""
    return redis_server_binary() is not None and redis_cli_binary() is not None


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServerError(RuntimeError):
    """A test Redis process could not be started or controlled; the message carries its log tail."""


class RedisServer:
    """One ``redis-server`` child process on a loopback port, with persistence off.

    ``start()`` picks a free port the first time and keeps it for later ``start()``/``restart()`` calls,
    so that clients configured with :attr:`url` find the server again. ``freeze()``/``thaw()`` send
    SIGSTOP/SIGCONT: the kernel still completes TCP handshakes but nothing answers, which is how a hung
    server looks to a client. Data does not survive ``stop()``.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.host = LOOPBACK
        self._fixed_port = port is not None
        self.port = port if port is not None else 0
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    # --- addresses ---------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://host:port/0``, the form ``ATTEST_NONCE_STORE`` takes."""
        return f"redis://{self.address}/0"

    @property
    def logfile(self) -> Path:
        """The server's log file (kept across restarts)."""
        return self.workdir / f"redis-{self.port}.log"

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (frozen counts as alive)."""
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A redis-py client of this server with short timeouts (for test set-up and assertions)."""
        # No retries: a test that freezes or stops the server wants the failure now, not after backoff.
        options: dict[str, object] = {
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "retry": Retry(NoBackoff(), 0),
            **kwargs,
        }
        return redis.Redis(host=self.host, port=self.port, **options)  # type: ignore[arg-type]

    # --- life cycle --------------------------------------------------------------------------------

    def command_line(self) -> list[str]:
        """The ``redis-server`` argv for the current port (subclasses add their mode)."""
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError("redis-server is not installed")
        options = {
            "port": str(self.port),
            "bind": self.host,
            "dir": str(self.workdir),
            "logfile": str(self.logfile),
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
        }
        return [binary, *(part for name, value in options.items() for part in (f"--{name}", value)), *self.extra_args]

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING; returns ``self``."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if (self._fixed_port or self.port) else PORT_ATTEMPTS
        for _ in range(attempts):
            if not self.port:
                self.port = free_port()
            # Output before the log file is opened (bad arguments, port in use) goes to a file next to it.
            with (self.workdir / f"redis-{self.port}.out").open("ab") as output:
                self._process = subprocess.Popen(
                    self.command_line(), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
                )
            self._frozen = False
            if self._wait_ready():
                return self
            self._reap()
            if not (self._fixed_port or attempts == 1):
                self.port = 0  # probably lost the port to another process: pick another one
        raise RedisServerError(f"redis-server on {self.address} did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    return False
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return True
                time.sleep(_POLL_SECONDS)
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period); idempotent."""
        if self._process is None:
            return
        if self._frozen:
            self.thaw()
        if self._process.poll() is None:
            self._process.terminate()
        self._reap()

    def kill(self) -> None:
        """Kill the process with SIGKILL, as a crash would."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._reap()

    def _reap(self) -> None:
        process, self._process = self._process, None
        self._frozen = False
        if process is None:
            return
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Suspend the process with SIGSTOP: connections are accepted by the kernel but never answered."""
        if self._process is None or not self.running:
            raise RedisServerError("cannot freeze a server that is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen process with SIGCONT."""
        if self._process is not None and self._frozen:
            self._process.send_signal(signal.SIGCONT)
        self._frozen = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Keep the server frozen for the duration of the ``with`` block."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log and output, for failure messages."""
        tails = []
        for path in (self.workdir / f"redis-{self.port}.out", self.logfile):
            with contextlib.suppress(OSError):
                tails.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(tails) or "(no log)"

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` process monitoring one master under :data:`SENTINEL_SERVICE`."""

    def __init__(self, workdir: Path, master: RedisServer, *, service_name: str = SENTINEL_SERVICE) -> None:
        super().__init__(workdir)
        self.master = master
        self.service_name = service_name

    @property
    def url(self) -> str:
        """``redis+sentinel://host:port/service/0``, the form ``ATTEST_NONCE_STORE`` takes."""
        return f"redis+sentinel://{self.address}/{self.service_name}/0"

    def command_line(self) -> list[str]:
        """Sentinel needs a writable configuration file: it rewrites it with what it learns."""
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError("redis-server is not installed")
        config = self.workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {self.workdir}\n"
            f"logfile {self.logfile}\n"
            f"sentinel monitor {self.service_name} {self.master.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service_name} 1000\n"
            f"sentinel failover-timeout {self.service_name} 3000\n"
        )
        return [binary, str(config), "--sentinel"]

    def _wait_ready(self) -> bool:
        if not super()._wait_ready():
            return False
        probe = self.client()
        try:
            return probe.execute_command("SENTINEL", "get-master-addr-by-name", self.service_name) is not None
        finally:
            probe.close()


def _cluster_node_args(*, cluster_port: int, replicas: int = 0) -> list[str]:
    options = {
        "cluster-enabled": "yes",
        "cluster-config-file": "nodes.conf",
        "cluster-port": str(cluster_port),
        "cluster-node-timeout": str(CLUSTER_NODE_TIMEOUT_MS),
        # A test may stop one node; the others keep answering for the slots they hold.
        "cluster-require-full-coverage": "no",
    }
    if replicas:
        # A replica whose link to its primary was interrupted (a test froze it) may still be promoted:
        # without this, a replica whose data is older than ten node timeouts refuses to fail over.
        options["cluster-replica-validity-factor"] = "0"
    return [part for name, value in options.items() for part in (f"--{name}", value)]


def _text(reply: object) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


class RedisClusterNodes:
    """Cluster-enabled servers joined with ``redis-cli --cluster create``: ``size`` masters, no replicas by
    default; with ``replicas=N``, N replicas per master (``size * (1 + N)`` nodes), for failover tests.
    """

    def __init__(self, workdir: Path, *, size: int = 3, replicas: int = 0) -> None:
        self.workdir = workdir
        self.replicas = replicas
        self.nodes = [
            RedisServer(
                workdir / f"node{index}",
                port=free_port(),
                extra_args=_cluster_node_args(cluster_port=free_port(), replicas=replicas),
            )
            for index in range(size * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://h:p,h:p,h:p``, the form ``ATTEST_NONCE_STORE`` takes."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> RedisClusterNodes:
        """Start every node, create the cluster on first start, and wait until every node reports ok."""
        fresh = not (self.nodes[0].workdir / "nodes.conf").exists()
        for node in self.nodes:
            node.start()
        if fresh:
            self._create()
        self.wait_ok()
        return self

    def _create(self) -> None:
        cli = redis_cli_binary()
        if cli is None:
            raise RedisServerError("redis-cli is not installed")
        argv = [cli, "--cluster", "create", *(n.address for n in self.nodes), "--cluster-replicas", str(self.replicas)]
        result = subprocess.run([*argv, "--cluster-yes"], capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")

    def wait_ok(self) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and knows all the others."""
        deadline = time.monotonic() + CLUSTER_CONVERGE_TIMEOUT_SECONDS
        pending = [node for node in self.nodes if node.running]
        while pending and time.monotonic() < deadline:
            node = pending[0]
            probe = node.client()
            try:
                info = probe.execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                info = b""
            finally:
                probe.close()
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text:
                pending.pop(0)
            else:
                time.sleep(_POLL_SECONDS * 5)
        if pending:
            raise RedisServerError(f"cluster did not converge; node {pending[0].address}:\n{pending[0].log_tail()}")

    def stop(self) -> None:
        """Stop every node; idempotent."""
        for node in self.nodes:
            node.stop()

    # --- topology (for failover tests) -------------------------------------------------------------

    def node_at(self, address: str) -> RedisServer:
        """The node listening on ``host:port`` (as CLUSTER NODES writes it, with or without ``@busport``)."""
        host_port = address.partition("@")[0]
        for node in self.nodes:
            if node.address == host_port:
                return node
        raise RedisServerError(f"no node of this cluster listens on {host_port}")

    def _ask(self, *command: str) -> object:
        """Send ``command`` to the first running node that answers."""
        for node in self.nodes:
            if not node.running:
                continue
            probe = node.client()
            try:
                return probe.execute_command(*command)
            except redis.RedisError:
                continue
            finally:
                probe.close()
        raise RedisServerError(f"no node answered {' '.join(command)}")

    def keyslot(self, key: str) -> int:
        """``CLUSTER KEYSLOT key``: the hash slot Redis puts ``key`` in."""
        return int(_text(self._ask("CLUSTER", "KEYSLOT", key)))

    def _cluster_nodes(self) -> list[list[str]]:
        """CLUSTER NODES as rows of fields: id, address, flags, master id, ..., slot ranges from field 8."""
        return [line.split() for line in _text(self._ask("CLUSTER", "NODES")).splitlines() if line.strip()]

    @staticmethod
    def _healthy(flags: str) -> bool:
        return not set(flags.split(",")) & {"fail", "fail?", "handshake", "noaddr"}

    def topology(self) -> dict[RedisServer, RedisServer | None]:
        """Each healthy master mapped to its first healthy replica (``None`` without one), from CLUSTER NODES."""
        rows = self._cluster_nodes()
        masters = {row[0]: self.node_at(row[1]) for row in rows if "master" in row[2] and self._healthy(row[2])}
        replica_of: dict[str, RedisServer] = {}
        for row in rows:
            if "slave" in row[2] and self._healthy(row[2]):
                replica_of.setdefault(row[3], self.node_at(row[1]))
        return {master: replica_of.get(node_id) for node_id, master in masters.items()}

    def master_of_slot(self, slot: int) -> RedisServer:
        """The healthy master serving ``slot`` now, from CLUSTER NODES."""
        for row in self._cluster_nodes():
            if "master" not in row[2] or not self._healthy(row[2]):
                continue
            for bounds in row[8:]:
                if bounds.startswith("["):
                    continue  # a slot being migrated; not in our tests' clusters
                low, _, high = bounds.partition("-")
                if int(low) <= slot <= int(high or low):
                    return self.node_at(row[1])
        raise RedisServerError(f"no healthy master serves slot {slot}")

    def wait_replicas_online(self) -> None:
        """Wait until every master reports its replicas connected and in sync (``state=online``)."""
        deadline = time.monotonic() + CLUSTER_CONVERGE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if all(self._replicas_online(master) for master in self.topology()):
                return
            time.sleep(_POLL_SECONDS * 5)
        raise RedisServerError("replicas did not come online")

    def _replicas_online(self, master: RedisServer) -> bool:
        probe = master.client()
        try:
            info = probe.info("replication")
        except redis.RedisError:
            return False
        finally:
            probe.close()
        online = [value for name, value in info.items()
                  if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"]
        return len(online) >= self.replicas

    def wait_promoted(self, replica: RedisServer, *, timeout: float = CLUSTER_CONVERGE_TIMEOUT_SECONDS) -> float:
        """Wait until every running node reports ``cluster_state:ok`` and lists ``replica`` as a master with slots.

        Returns the seconds waited. Raises :class:`RedisServerError` with the replica's log tail on timeout.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if all(self._sees_master(node, replica) for node in self.nodes if node.running):
                return time.monotonic() - started
            time.sleep(_POLL_SECONDS)
        raise RedisServerError(f"replica {replica.address} was not promoted:\n{replica.log_tail()}")

    @staticmethod
    def _sees_master(node: RedisServer, master: RedisServer) -> bool:
        """Whether ``node`` reports the cluster ok and ``master`` as a healthy master serving slots."""
        probe = node.client()
        try:
            info = _text(probe.execute_command("CLUSTER", "INFO"))
            rows = [line.split() for line in _text(probe.execute_command("CLUSTER", "NODES")).splitlines()]
        except redis.RedisError:
            return False
        finally:
            probe.close()
        return "cluster_state:ok" in info and any(
            row[1].partition("@")[0] == master.address and "master" in row[2]
            and RedisClusterNodes._healthy(row[2]) and len(row) > 8
            for row in rows if len(row) > 2)

    def __enter__(self) -> RedisClusterNodes:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def _workdir(workdir: Path | None, prefix: str) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


@contextlib.contextmanager
def redis_server(workdir: Path | None = None, *, extra_args: Sequence[str] = ()) -> Iterator[RedisServer]:
    """A running standalone server, stopped on exit (``workdir`` defaults to a temporary directory)."""
    with _workdir(workdir, "redis-") as path, RedisServer(path, extra_args=extra_args) as server:
        yield server


@contextlib.contextmanager
def redis_cluster(workdir: Path | None = None, *, replicas: int = 0) -> Iterator[RedisClusterNodes]:
    """A running three-master cluster (with ``replicas`` replicas per master, in sync), stopped on exit."""
    with _workdir(workdir, "redis-cluster-") as path, RedisClusterNodes(path, replicas=replicas) as cluster:
        if replicas:
            cluster.wait_replicas_online()
        yield cluster


@contextlib.contextmanager
def redis_sentinel(master: RedisServer, workdir: Path | None = None) -> Iterator[SentinelServer]:
    """A running sentinel monitoring ``master`` as :data:`SENTINEL_SERVICE`, stopped on exit."""
    with _workdir(workdir, "redis-sentinel-") as path, SentinelServer(path, master) as sentinel:
        yield sentinel
