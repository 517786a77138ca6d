"""Fixtures shared by the IMDS tests: fixed keys, a fixed instant, and the real Azure documents."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attest_service.clouds import CloudProfile
from attest_service.imds import pki
from attest_service.imds.emulator import EmulatorPki, EmulatorSettings
from tests.support.azure_real import real_documents

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The instant the deterministic fixtures are built at.
FIXED_NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The directory of real Azure documents (skips, or under CI fails, when it is missing)."""
    return real_documents()


@pytest.fixture(scope="session")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    """Three RSA keys (root, issuing CA, leaf), generated once per session."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="session")
def ec_keys() -> list[ec.EllipticCurvePrivateKey]:
    """Three ECDSA keys (root P-384, issuing CA P-384, leaf P-256)."""
    return [
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP256R1()),
    ]


def build_chain(
    keys: list[rsa.RSAPrivateKey] | list[ec.EllipticCurvePrivateKey], *, domain: str = "metadata.azure.com"
) -> tuple[pki.CertifiedKey, pki.CertifiedKey, pki.CertifiedKey]:
    """A deterministic root -> issuing CA -> leaf chain from fixed keys, serials and times."""
    root = pki.make_root(
        common_name="Test Root",
        key=keys[0],
        not_before=FIXED_NOW - pki.CERTIFICATE_BACKDATE,
        not_after=FIXED_NOW + pki.ROOT_VALIDITY,
        serial=1001,
    )
    issuing = pki.make_intermediate(
        common_name="Test Issuing CA 01",
        key=keys[1],
        issuer=root,
        not_before=FIXED_NOW - pki.CERTIFICATE_BACKDATE,
        not_after=FIXED_NOW + pki.ISSUING_CA_VALIDITY,
        serial=2002,
    )
    leaf = pki.make_leaf(
        dns_names=[f"eastus.{domain}", domain],
        common_name=domain,
        key=keys[2],
        issuer=issuing,
        not_before=FIXED_NOW - pki.CERTIFICATE_BACKDATE,
        not_after=FIXED_NOW + pki.LEAF_VALIDITY,
        serial=3003,
    )
    return root, issuing, leaf


@pytest.fixture(scope="session")
def rsa_chain(rsa_keys: list[rsa.RSAPrivateKey]) -> tuple[pki.CertifiedKey, pki.CertifiedKey, pki.CertifiedKey]:
    return build_chain(rsa_keys)


def sample_content(nonce: str = "abc123") -> bytes:
    return pki.attested_content(
        nonce=nonce,
        vm_id="11111111-2222-3333-4444-555555555555",
        subscription_id="66666666-7777-8888-9999-000000000000",
        sku="20_04-lts-gen2",
        plan=("planname", "product", "publisher"),
        license_type="",
        created_on=FIXED_NOW,
        expires_on=FIXED_NOW + pki.DOCUMENT_LIFETIME,
    )


@pytest.fixture(scope="session")
def emulator_signing() -> EmulatorPki:
    """One emulator PKI for the session (key generation is the slow part of starting an emulator)."""
    return EmulatorPki.generate(EmulatorSettings(), datetime.now(UTC))


@pytest.fixture(scope="session")
def emulator_pki_dir(tmp_path_factory: pytest.TempPathFactory, emulator_signing: EmulatorPki) -> Path:
    """A pinned directory trusting ``emulator_signing`` for the public cloud."""
    directory = tmp_path_factory.mktemp("pinned")
    emulator_signing.write(directory, CloudProfile.public())
    return directory
