"""Fixtures of the trust-operations tests: an Azure-shaped PKI, a pinned directory, signed documents."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


def make_leaf(issuer: pki.CertifiedKey, key: rsa.RSAPrivateKey, now: datetime, *,
              ca_issuers: Sequence[str] = ()) -> pki.CertifiedKey:
    """An Azure-shaped signer; ``ca_issuers`` adds an AIA extension as Azure's leaves carry."""
    leaf = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                         common_name="metadata.azure.com", key=key, issuer=issuer, not_before=now - DAY,
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
