"""Fixtures of the trust-operations tests: an Azure-shaped PKI, a pinned directory, signed documents."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from attest_service import cli
from attest_service.imds import pki
from attest_service.trust import MANIFEST, load_trust, manifest_entry

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "pinned_certs"
DAY = timedelta(days=1)
#: Longest a held answer of the CA server waits for its release (a test that forgets to release it).
HOLD_SECONDS = 10.0


@dataclass(frozen=True)
class Pki:
    """A root, an issuing CA under it and a document-signing leaf under that, valid around ``now``."""

    now: datetime
    root: pki.CertifiedKey
    issuing: pki.CertifiedKey
    leaf: pki.CertifiedKey


@pytest.fixture(scope="session")
def leaf_key() -> rsa.RSAPrivateKey:
    # Documents are signed with RSA as Azure does; one key serves every test (CAs use fast EC keys).
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_ca(name: str, issuer: pki.CertifiedKey, now: datetime, *, days: int = 365, ca: bool = True,
            start: datetime | None = None) -> pki.CertifiedKey:
    return pki.make_intermediate(common_name=name, key=pki.new_key("ec"), issuer=issuer,
                                 not_before=start or now - DAY, not_after=(start or now) + timedelta(days=days),
                                 serial=x509.random_serial_number(), path_length=0 if ca else None, ca=ca)


def make_root(name: str, now: datetime) -> pki.CertifiedKey:
    return pki.make_root(common_name=name, key=pki.new_key("ec"), not_before=now - DAY,
                         not_after=now + timedelta(days=3650), serial=x509.random_serial_number())


def make_named_ca(subject: x509.Name, issuer: pki.CertifiedKey | None, now: datetime, *,
                  days: int = 365) -> pki.CertifiedKey:
    """A CA with any subject (``pki`` names every CA "O=Microsoft Corporation"); self-signed without ``issuer``."""
    key = pki.new_key("ec")
    signer = issuer.private_key if issuer is not None else key
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.certificate.subject if issuer is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - DAY).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()), critical=False)
    return pki.CertifiedKey(certificate=builder.sign(signer, hashes.SHA256()), private_key=key)


def digicert_name(common: str) -> x509.Name:
    """A subject shaped like DigiCert's CAs (the organisation Azure China's issuing CAs name)."""
    return x509.Name([x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "DigiCert Inc"),
                      x509.NameAttribute(x509.NameOID.COMMON_NAME, common)])


def make_leaf(issuer: pki.CertifiedKey, key: rsa.RSAPrivateKey, now: datetime, *,
              ca_issuers: Sequence[str] = (), domain: str = "metadata.azure.com") -> pki.CertifiedKey:
    """An Azure-shaped signer of ``domain``; ``ca_issuers`` adds an AIA extension as Azure's leaves carry."""
    leaf = pki.make_leaf(dns_names=[f"eastus.{domain}", domain],
                         common_name=domain, key=key, issuer=issuer, not_before=now - DAY,
                         not_after=now + timedelta(days=300), serial=x509.random_serial_number())
    if not ca_issuers:
        return leaf
    # pki.make_leaf has no AIA option: rebuild the same certificate with the extension added.
    cert = leaf.certificate
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_extension(x509.AuthorityInformationAccess([
        x509.AccessDescription(x509.AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url))
        for url in ca_issuers]), critical=False)
    signed = builder.sign(issuer.private_key, hashes.SHA256())
    return pki.CertifiedKey(certificate=signed, private_key=key)


def sign_document(leaf: pki.CertifiedKey, now: datetime, nonce: str = "ops-test-nonce") -> bytes:
    """A DER attested document signed by ``leaf``, valid at ``now``."""
    content = pki.attested_content(nonce=nonce, vm_id="00000000-0000-0000-0000-000000000001",
                                   subscription_id="00000000-0000-0000-0000-000000000002", sku="sku",
                                   plan=("", "", ""), license_type="", created_on=now - timedelta(minutes=1),
                                   expires_on=now + timedelta(hours=6))
    return pki.sign_attested(content, signer=leaf)


def response_json(document: bytes) -> bytes:
    """The IMDS response body holding ``document``."""
    return json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(document).decode()}).encode()


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def write_manifest(directory: Path) -> None:
    """A manifest in step with the files, as the bundled directory has."""
    trust = load_trust(directory)
    entries = [manifest_entry(pin, "test fixture") for pin in trust.all_pins()]
    (directory / MANIFEST).write_text(json.dumps({"certificates": entries}))


def tree_digest(directory: Path) -> str:
    """SHA-256 over every file's relative path and content: equal digests mean nothing changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="session")
def pki_set(leaf_key: rsa.RSAPrivateKey) -> Pki:
    now = datetime.now(UTC)
    root = make_root("Ops Test Root", now)
    issuing = make_ca("Ops Test Issuing CA 01", root, now)
    return Pki(now=now, root=root, issuing=issuing, leaf=make_leaf(issuing, leaf_key, now))


@pytest.fixture
def pinned(tmp_path: Path, pki_set: Pki) -> Path:
    """A pinned directory for the public cloud: the root and the issuing CA, with its manifest."""
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "public", root=pki_set.root.certificate,
                         intermediates=[pki_set.issuing.certificate])
    write_manifest(directory)
    return directory


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]
            ) -> Callable[..., tuple[int, str, str]]:
    """Run ``attest-service ARGS`` in process; returns (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --- a CA repository on loopback, standing in for Microsoft's and DigiCert's AIA hosts ---------------------


@dataclass
class CaServer:
    """A loopback HTTP server answering fixed paths, counting requests per path.

    ``delays`` holds seconds to wait before answering a path (a slow repository). ``hold(path)`` keeps the
    answers to a path until the event it returns is set (a repository as slow as the test wants), and
    ``arrived[path]`` is set when a request for the path has come in.
    """

    port: int = 0
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    held: dict[str, threading.Event] = field(default_factory=dict)
    arrived: defaultdict[str, threading.Event] = field(default_factory=lambda: defaultdict(threading.Event))

    def hold(self, path: str) -> threading.Event:
        """Keep the answers to ``path`` until the returned event is set (or ten seconds pass)."""
        release = self.held[path] = threading.Event()
        return release

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def publish(self, path: str, der: bytes) -> str:
        """Serve ``der`` at ``path`` as application/pkix-cert; returns its URL."""
        self.routes[path] = (200, {"Content-Type": "application/pkix-cert"}, der)
        return self.url(path)


@contextlib.contextmanager
def ca_server() -> Iterator[CaServer]:
    """A started :class:`CaServer`, shut down on exit."""
    state = CaServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            state.arrived[self.path].set()
            release = state.held.get(self.path)
            if release is not None:
                release.wait(HOLD_SECONDS)
            delay = state.delays.get(self.path, 0.0)
            if delay:
                time.sleep(delay)
            status, headers, body = state.routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[CaServer]:
    with ca_server() as state:
        yield state
