"""Sentinel and Cluster over TLS: ``rediss+sentinel://`` and ``rediss+cluster://`` against real TLS-only servers.

Every server here listens on a TLS port only (``--port 0 --tls-port P``) and requires a client certificate
(``tls-auth-clients yes``): the master and its sentinel, and the nodes of a cluster, which also speak TLS to
each other. So an acceptance proves that the store reached the sentinel and the data node over TLS, with the
CA and client certificate given in the URL as for ``rediss://``; a plain URL, a wrong CA or a missing client
certificate is refused (503, nothing accepted). The certificates are made here with cryptography.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attest_service.errors import ConfigurationError, NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis.urls import MultiHostURL
from tests.support.redis_server import (
    LOOPBACK,
    RedisClusterNodes,
    RedisServer,
    RedisServerError,
    SentinelServer,
    _cluster_node_args,
    free_port,
    redis_cli_binary,
)
from tests.support.tools import requires_redis

from .conftest import utcnow

#: Store timeout of these tests, in seconds: a TLS handshake on a loaded machine takes longer than a plain PING.
TLS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate, both under the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def query(self, **overrides: str | None) -> str:
        """The TLS options of a store URL (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``), as a query."""
        options: dict[str, str | None] = {"ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.client_cert),
                                          "ssl_keyfile": str(self.client_key), **overrides}
        return urlencode({name: value for name, value in options.items() if value is not None})

    def client_options(self) -> dict[str, object]:
        """redis-py options of a test client of these servers."""
        return {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.client_cert),
                "ssl_keyfile": str(self.client_key)}

    def server_args(self) -> list[str]:
        """``redis-server`` arguments: TLS for clients and replication, client certificates required."""
        return ["--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes", "--tls-replication", "yes"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           *, usage: ExtendedKeyUsageOID | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1)))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]), critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *items: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    data = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            data += item.public_bytes(serialization.Encoding.PEM)
        else:
            data += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca_key, server_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _issue("attest test Redis CA", ca_key, None)
    issuer = (ca.subject, ca_key)
    return TlsFiles(
        ca=_write(directory / "ca.pem", ca),
        server_cert=_write(directory / "server.pem", _issue(LOOPBACK, server_key, issuer)),
        server_key=_write(directory / "server.key", server_key),
        client_cert=_write(directory / "client.pem",
                           _issue("attest-service", client_key, issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
        client_key=_write(directory / "client.key", client_key),
        other_ca=_write(directory / "other-ca.pem", _issue("another CA", other_key, None)),
    )


class TlsRedisServer(RedisServer):
    """A redis-server listening on a TLS port only (its ``port`` is the TLS port), client certificates required."""

    def __init__(self, workdir: Path, files: TlsFiles, *, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, port=port, extra_args=extra_args)
        self.files = files

    def command_line(self) -> list[str]:
        """The plain command line, with the plain port closed and the TLS port opened instead."""
        argv = super().command_line()
        argv[argv.index("--port") + 1] = "0"
        return [*argv, "--tls-port", str(self.port), *self.files.server_args()]

    def client(self, **kwargs: object) -> redis.Redis:
        """A TLS client with the test's client certificate."""
        return super().client(**{**self.files.client_options(), **kwargs})


class TlsSentinel(SentinelServer):
    """A sentinel on a TLS port only, reaching its TLS master over TLS (``tls-replication``)."""

    def __init__(self, workdir: Path, master: TlsRedisServer) -> None:
        super().__init__(workdir, master)
        self.files = master.files

    def command_line(self) -> list[str]:
        """Sentinel's configuration file, with TLS settings."""
        argv = super().command_line()
        config = Path(argv[1])
        files = self.files
        config.write_text(config.read_text().replace(f"port {self.port}\n", "port 0\n") + (
            f"tls-port {self.port}\ntls-cert-file {files.server_cert}\ntls-key-file {files.server_key}\n"
            f"tls-ca-cert-file {files.ca}\ntls-auth-clients yes\ntls-replication yes\n"))
        return argv

    def client(self, **kwargs: object) -> redis.Redis:
        """A TLS client with the test's client certificate."""
        return super().client(**{**self.files.client_options(), **kwargs})


class TlsCluster(RedisClusterNodes):
    """Three TLS-only cluster masters, whose cluster bus speaks TLS too (``tls-cluster``)."""

    def __init__(self, workdir: Path, files: TlsFiles) -> None:
        super().__init__(workdir)
        self.files = files
        self.nodes = [TlsRedisServer(workdir / f"node{index}", files, port=free_port(),
                                     extra_args=(*_cluster_node_args(cluster_port=free_port()), "--tls-cluster", "yes"))
                      for index in range(3)]

    def _create(self) -> None:
        cli = redis_cli_binary()
        if cli is None:
            raise RedisServerError("redis-cli is not installed")
        files = self.files
        argv = [cli, "--tls", "--cacert", str(files.ca), "--cert", str(files.client_cert), "--key",
                str(files.client_key), "--cluster", "create", *(node.address for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")


def _claim(store: NonceStore, nonce: str) -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id="client", expires_at=now + timedelta(minutes=10), require_challenge=False,
                        now=now)


def _refused(url: str, nonce: str) -> None:
    store = open_store(url, timeout_seconds=TLS_TIMEOUT_SECONDS, min_replicas=0)
    try:
        with pytest.raises(StoreUnavailable):
            _claim(store, nonce)
    finally:
        store.close()


# --- Sentinel ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_sentinel(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSentinel]:
    workdir = tmp_path_factory.mktemp("tls-sentinel")
    with TlsRedisServer(workdir / "master", tls) as master, TlsSentinel(workdir / "sentinel", master) as sentinel:
        yield sentinel


def _sentinel_url(sentinel: TlsSentinel, scheme: str = "rediss+sentinel", **overrides: str | None) -> str:
    return f"{scheme}://{sentinel.address}/{sentinel.service_name}/0?{sentinel.files.query(**overrides)}"


@pytest.mark.slow
@requires_redis
def test_rediss_sentinel_reaches_sentinel_and_master_over_tls(tls_sentinel: TlsSentinel) -> None:
    store = open_store(_sentinel_url(tls_sentinel), timeout_seconds=TLS_TIMEOUT_SECONDS, min_replicas=0)
    try:
        assert _claim(store, "tls-sentinel-1") == Acceptance(challenge=False)
        with pytest.raises(NonceReplayed):
            _claim(store, "tls-sentinel-1")
    finally:
        store.close()
    # The record is on the TLS-only master.
    client = tls_sentinel.master.client()
    try:
        assert client.dbsize() >= 1
    finally:
        client.close()


@pytest.mark.slow
@requires_redis
@pytest.mark.parametrize("refusal", ["plain URL", "other CA", "no client certificate"])
def test_rediss_sentinel_refuses_what_tls_does_not_admit(tls_sentinel: TlsSentinel, refusal: str) -> None:
    if refusal == "plain URL":
        # Without TLS the sentinel is not even reachable: nothing crosses the network in clear.
        url = f"redis+sentinel://{tls_sentinel.address}/{tls_sentinel.service_name}/0"
    elif refusal == "other CA":
        url = _sentinel_url(tls_sentinel, ssl_ca_certs=str(tls_sentinel.files.other_ca))
    else:
        url = _sentinel_url(tls_sentinel, ssl_certfile=None, ssl_keyfile=None)
    _refused(url, f"tls-sentinel-refused-{refusal}")


# --- Cluster -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    with TlsCluster(tmp_path_factory.mktemp("tls-cluster"), tls) as cluster:
        yield cluster


def _cluster_url(cluster: TlsCluster, scheme: str = "rediss+cluster", **overrides: str | None) -> str:
    return f"{scheme}://{','.join(node.address for node in cluster.nodes)}?{cluster.files.query(**overrides)}"


@pytest.mark.slow
@requires_redis
def test_rediss_cluster_reaches_every_node_over_tls(tls_cluster: TlsCluster) -> None:
    store = open_store(_cluster_url(tls_cluster), timeout_seconds=TLS_TIMEOUT_SECONDS, min_replicas=0)
    try:
        nonces = [f"tls-cluster-{index}" for index in range(12)]  # spread over the three nodes' slots
        for nonce in nonces:
            assert _claim(store, nonce) == Acceptance(challenge=False)
        for nonce in nonces:
            with pytest.raises(NonceReplayed):
                _claim(store, nonce)
        store.ping()
    finally:
        store.close()
    stored = 0
    for node in tls_cluster.nodes:
        client = node.client()
        try:
            held = int(client.dbsize())
        finally:
            client.close()
        assert held > 0, f"no claim reached node {node.address}"
        stored += held
    assert stored >= len(nonces)


@pytest.mark.slow
@requires_redis
@pytest.mark.parametrize("refusal", ["plain URL", "other CA", "no client certificate"])
def test_rediss_cluster_refuses_what_tls_does_not_admit(tls_cluster: TlsCluster, refusal: str) -> None:
    if refusal == "plain URL":
        url = "redis+cluster://" + ",".join(node.address for node in tls_cluster.nodes)
    elif refusal == "other CA":
        url = _cluster_url(tls_cluster, ssl_ca_certs=str(tls_cluster.files.other_ca))
    else:
        url = _cluster_url(tls_cluster, ssl_certfile=None, ssl_keyfile=None)
    _refused(url, f"tls-cluster-refused-{refusal}")


# --- the URL's TLS options -------------------------------------------------------------------------------------------


def test_tls_options_are_taken_from_the_query_of_the_rediss_forms() -> None:
    parsed = MultiHostURL.parse("rediss+sentinel://:pw@s1:26380,s2/mymaster/0?ssl_ca_certs=/etc/ca.pem&"
                                "ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/c.key&ssl_cert_reqs=required&"
                                "ssl_check_hostname=false", default_port=26379)
    assert parsed.hosts == (("s1", 26380), ("s2", 26379))
    assert parsed.tls_options() == {"ssl": True, "ssl_ca_certs": "/etc/ca.pem", "ssl_certfile": "/etc/c.pem",
                                    "ssl_keyfile": "/etc/c.key", "ssl_cert_reqs": "required",
                                    "ssl_check_hostname": False}
    assert MultiHostURL.parse("rediss+cluster://n1:6380", default_port=6379).tls_options() == {"ssl": True}
    assert MultiHostURL.parse("redis+cluster://n1:6379", default_port=6379).tls_options() == {}


@pytest.mark.parametrize("url", [
    "redis+sentinel://s1/mymaster?ssl_ca_certs=/etc/ca.pem",       # TLS options without TLS
    "rediss+sentinel://s1/mymaster?password=secret",               # not a TLS option
    "rediss+cluster://n1?ssl_cert_reqs=maybe",
    "rediss+cluster://n1?ssl_check_hostname=perhaps",
    "rediss+cluster://n1?ssl_ca_certs=",
    "rediss+cluster://n1?ssl_ca_certs=/a&ssl_ca_certs=/b",
])
def test_bad_tls_options_are_refused_at_start(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"option|ssl_|query"):
        open_store(url, timeout_seconds=TLS_TIMEOUT_SECONDS)
