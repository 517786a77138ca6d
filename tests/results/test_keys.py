"""The key directory: which keys sign, how they are published, what is refused, ``keys new``, the default key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from attest_service.errors import ConfigurationError
from attest_service.results import ensure_generated_key, load_keys, write_new_key
from attest_service.results.keys import GENERATED_KEY_NAME, read_key
from tests.results.conftest import required_members, rfc7638, write_key
from tests.support.service import REPO_ROOT

#: RFC 7638, section 3.1: the RSA key of RFC 7517 appendix A.1 and its SHA-256 thumbprint.
RFC7638_KEY = {
    "kty": "RSA", "e": "AQAB",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
         "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgd"
         "AZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur"
         "-kEgU8awapJzKnqDKgw",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_the_thumbprint_written_out_here_gives_the_rfc_7638_vector() -> None:
    assert rfc7638(RFC7638_KEY) == RFC7638_THUMBPRINT


@pytest.mark.parametrize(("private", "alg", "kty"), [
    (ec.generate_private_key(ec.SECP256R1()), "ES256", "EC"),
    (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "RSA"),
    (ed25519.Ed25519PrivateKey.generate(), "EdDSA", "OKP"),
], ids=["P-256", "RSA-2048", "Ed25519"])
def test_each_key_type_has_its_algorithm_and_its_rfc_7638_kid(tmp_path: Path, private: object, alg: str,
                                                             kty: str) -> None:
    write_key(tmp_path, "k.pem", private)
    key = load_keys(tmp_path).signing
    assert (key.alg, key.kid) == (alg, rfc7638(required_members(private)))
    published = key.public_jwk()
    assert published["kid"] == key.kid
    assert published["alg"] == alg
    assert published["use"] == "sig"
    assert published["kty"] == kty
    # The public members only: the published JWK carries exactly the members RFC 7638 hashes, plus ours.
    assert set(published) == {*required_members(private), "kid", "alg", "use"}


def _pem(private: object) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                 serialization.NoEncryption())


@pytest.mark.parametrize(("content", "message"), [
    (lambda: _pem(ec.generate_private_key(ec.SECP384R1())), "only P-256"),
    (lambda: _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "at least 2048 bits"),
    (lambda: _pem(ed448.Ed448PrivateKey.generate()), "expected an EC P-256"),
    (lambda: _pem(dsa.generate_private_key(key_size=2048)), "expected an EC P-256"),
    (lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")), "not an unencrypted PEM private key"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
             b"-----END PRIVATE KEY-----\n", "not an unencrypted PEM private key"),
    (lambda: b"\x00" * 70_000, "larger than"),
], ids=["P-384", "RSA-1024", "Ed448", "DSA", "encrypted", "truncated", "huge"])
def test_unusable_keys_are_refused_naming_the_file_and_nothing_of_its_content(tmp_path: Path, content: object,
                                                                               message: str) -> None:
    data = content()  # type: ignore[operator]
    path = tmp_path / "bad.pem"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError) as caught:
        load_keys(tmp_path)
    assert message in caught.value.message
    assert "bad.pem" in caught.value.message
    assert "PRIVATE KEY" not in caught.value.message
    assert "MIG" not in caught.value.message
    assert caught.value.__cause__ is None  # the library's own message is not chained either


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o606, 0o660])
def test_a_key_file_others_may_read_or_write_is_refused(key_dir: Path, mode: int) -> None:
    (key_dir / "a.pem").chmod(mode)
    with pytest.raises(ConfigurationError, match=r"a\.pem has mode .*readable by its owner only"):
        load_keys(key_dir)


def test_group_read_is_refused_unless_the_group_is_the_services_own(key_dir: Path) -> None:
    path = key_dir / "a.pem"
    path.chmod(0o640)
    os.chown(path, -1, os.getegid())
    load_keys(key_dir)  # Kubernetes' fsGroup: the pod's own group, group read added by the kubelet
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to one the test user is not in needs root")
    os.chown(path, -1, os.getegid() + 4242)
    with pytest.raises(ConfigurationError, match="readable by its owner only"):
        load_keys(key_dir)


def test_the_last_name_signs_and_every_key_is_published(key_dir: Path) -> None:
    write_key(key_dir, "b.pem", ed25519.Ed25519PrivateKey.generate())
    write_key(key_dir, "0.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (key_dir / "notes.txt").write_text("not a key")
    (key_dir / ".b.pem.swp").write_text("an editor's file")
    keys = load_keys(key_dir)
    assert [key.name for key in keys.keys] == ["0.pem", "a.pem", "b.pem"]
    assert keys.signing.name == "b.pem"
    assert keys.signing.alg == "EdDSA"
    published = keys.jwks()["keys"]
    assert [jwk["kid"] for jwk in published] == [key.kid for key in keys.keys]  # type: ignore[index, union-attr]
    text = json.dumps(published)
    for private_member in ('"d"', '"p"', '"q"', '"dp"', '"dq"', '"qi"'):
        assert private_member not in text


def test_an_empty_or_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="holds no"):
        load_keys(tmp_path)
    with pytest.raises(ConfigurationError, match="is not a directory"):
        load_keys(tmp_path / "missing")


def test_a_fifo_under_a_keys_name_is_refused_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "k.pem", 0o600)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_keys(tmp_path)


def _keys_new(directory: Path, *algorithm: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attest_service", "keys", "new", str(directory), *algorithm],
                          capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)


@pytest.mark.slow
def test_keys_new_writes_a_private_key_that_sorts_last_and_prints_its_kid(tmp_path: Path) -> None:
    directory = tmp_path / "result-keys"
    first = _keys_new(directory)
    assert first.returncode == 0, first.stderr
    write_key(directory, "zzz.pem", ec.generate_private_key(ec.SECP256R1()))  # a hand-named key sorting last
    second = _keys_new(directory, "--algorithm", "EdDSA")
    assert second.returncode == 0, second.stderr
    keys = load_keys(directory)
    assert keys.signing.kid == second.stdout.strip()
    assert keys.signing.alg == "EdDSA"
    assert first.stdout.strip() == keys.keys[0].kid
    assert len(keys.keys) == 3
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    for path in directory.iterdir():
        if path.name != "zzz.pem":
            assert path.stat().st_mode & 0o777 == 0o600, path
    rsa_key = _keys_new(directory, "--algorithm", "RS256")
    assert rsa_key.returncode == 0
    assert load_keys(directory).signing.alg == "RS256"
    assert "PRIVATE" not in first.stdout + first.stderr + second.stdout + second.stderr


@pytest.mark.slow
def test_keys_new_refuses_an_unknown_algorithm_as_a_usage_error(tmp_path: Path) -> None:
    result = _keys_new(tmp_path, "--algorithm", "HS256")
    assert result.returncode == 2
    assert not list(tmp_path.iterdir())


def test_write_new_key_names_sort_in_the_order_written(tmp_path: Path) -> None:
    kids = [write_new_key(tmp_path).kid for _ in range(3)]
    assert [key.kid for key in load_keys(tmp_path).keys] == kids


@pytest.mark.slow
def test_the_default_key_is_generated_once_even_by_racing_processes(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "result-keys"
    code = ("import sys; from pathlib import Path; from attest_service.results import ensure_generated_key; "
            "print(ensure_generated_key(Path(sys.argv[1])))")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT) for _ in range(6)]
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert outputs.count("True") == 1, outputs
    assert sorted(path.name for path in directory.iterdir()) == [GENERATED_KEY_NAME]
    key = directory / GENERATED_KEY_NAME
    assert key.stat().st_mode & 0o777 == 0o600
    assert read_key(key).alg == "ES256"
    kid = read_key(key).kid
    assert ensure_generated_key(directory) is False
    assert read_key(key).kid == kid
