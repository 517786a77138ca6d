"""Fixtures of the attestation-result tests: key directories, and the library's verifier over the test cases."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from attest_service import Verifier, open_store
from attest_service.nonces import NonceStore
from tests.verify.conftest import TESTCASES

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def write_key(directory: Path, name: str, private: object, *, mode: int = 0o600) -> Path:
    """Write ``private`` as unencrypted PKCS8 PEM to ``directory/name`` with ``mode``."""
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.chmod(mode)
    return path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc7638(members: dict[str, str]) -> str:
    """RFC 7638 section 3, written out here (independent of the service's JOSE library): the SHA-256 of the
    required members, in lexicographic order, without whitespace."""
    return b64url(hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest())


def required_members(private: object) -> dict[str, str]:
    """The members RFC 7638 hashes, computed from the key's numbers with cryptography alone."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        numbers = private.public_key().public_numbers()
        return {"crv": "P-256", "kty": "EC", "x": b64url(numbers.x.to_bytes(32, "big")),
                "y": b64url(numbers.y.to_bytes(32, "big"))}
    if isinstance(private, rsa.RSAPrivateKey):
        public = private.public_key().public_numbers()
        return {"e": b64url(public.e.to_bytes((public.e.bit_length() + 7) // 8, "big")), "kty": "RSA",
                "n": b64url(public.n.to_bytes((public.n.bit_length() + 7) // 8, "big"))}
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}


@pytest.fixture(scope="session")
def verifier() -> Verifier:
    return Verifier.from_directory(TESTCASES / "pinned")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NonceStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'nonces.sqlite3'}")
    yield opened
    opened.close()


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    """A directory holding one P-256 key, ``a.pem``."""
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    write_key(directory, "a.pem", ec.generate_private_key(ec.SECP256R1()))
    return directory
