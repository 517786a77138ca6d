"""The Azure-shaped PKI and signer: shape compared with real documents, verification, determinism."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from attest_service.imds import pki
from tests.support import tools
from tests.support.azure_real import azure_certs_dir, require

from .conftest import FIXED_NOW, build_chain, sample_content

Chain = tuple[pki.CertifiedKey, pki.CertifiedKey, pki.CertifiedKey]


def _signed_data(der: bytes) -> cms.SignedData:
    info = cms.ContentInfo.load(der)
    assert info["content_type"].native == "signed_data"
    return info["content"]


def _real_document(real_dir: Path, name: str) -> bytes:
    return base64.b64decode(json.loads((real_dir / name).read_text())["signature"])


REAL_2026 = "tc-2026-04-23-microsoft-azure-rsa-tls-issuing-ca-04.json"


# --- content --------------------------------------------------------------------------------------


def test_imds_timestamp_format() -> None:
    assert pki.imds_timestamp(datetime(2026, 4, 23, 15, 49, 58, tzinfo=UTC)) == "04/23/26 15:49:58 -0000"


def test_imds_timestamp_converts_to_utc() -> None:
    east = datetime(2026, 4, 23, 17, 0, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert pki.imds_timestamp(east) == "04/23/26 17:00:00 -0000"


def test_imds_timestamp_refuses_naive() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.imds_timestamp(datetime(2026, 1, 1))  # noqa: DTZ001 - the naive instant is the point


def test_default_nonce_is_the_expiry_instant() -> None:
    assert pki.default_nonce(datetime(2026, 6, 26, 0, 56, 45, tzinfo=UTC)) == "20260626-005645"


def test_content_is_compact_json_in_imds_key_order() -> None:
    content = sample_content("n1")
    assert b" " not in content.replace(b"/26 ", b"").replace(b" -0000", b"")
    claims = json.loads(content)
    assert list(claims) == ["licenseType", "nonce", "plan", "sku", "subscriptionId", "timeStamp", "vmId"]
    assert list(claims["plan"]) == ["name", "product", "publisher"]
    assert claims["plan"] == {"name": "planname", "product": "product", "publisher": "publisher"}
    assert claims["timeStamp"] == {"createdOn": "01/15/26 12:00:00 -0000", "expiresOn": "01/15/26 18:00:00 -0000"}


def test_content_matches_a_real_document_byte_for_byte(real_dir: Path) -> None:
    expected = next(e for e in json.loads((real_dir / "expected.json").read_text()) if e["document"] == REAL_2026)
    claims = expected["claims"]
    created = datetime.strptime(claims["timeStamp"]["createdOn"], pki.IMDS_TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    rebuilt = pki.attested_content(
        nonce=claims["nonce"],
        vm_id=claims["vmId"],
        subscription_id=claims["subscriptionId"],
        sku=claims["sku"],
        plan=(claims["plan"]["name"], claims["plan"]["product"], claims["plan"]["publisher"]),
        license_type=claims["licenseType"],
        created_on=created,
        expires_on=created + pki.DOCUMENT_LIFETIME,
    )
    real = _signed_data(_real_document(real_dir, REAL_2026))
    assert rebuilt == real["encap_content_info"]["content"].native
    assert claims["nonce"] == pki.default_nonce(created + pki.DOCUMENT_LIFETIME)


# --- document shape -------------------------------------------------------------------------------


def test_document_has_the_shape_of_a_real_one(real_dir: Path, rsa_chain: Chain) -> None:
    ours = _signed_data(pki.sign_attested(sample_content(), signer=rsa_chain[2]))
    real = _signed_data(_real_document(real_dir, REAL_2026))
    for sd in (ours, real):
        assert sd["version"].native == "v1"
        assert sd["encap_content_info"]["content_type"].native == "data"
        assert len(sd["certificates"]) == 1
        assert sd["crls"].native is None
        assert len(sd["signer_infos"]) == 1
    # The algorithm identifiers must be byte-identical: sha256WithRSAEncryption with NULL parameters in
    # both digest fields, rsaEncryption with NULL parameters as signatureAlgorithm.
    assert ours["digest_algorithms"].dump() == real["digest_algorithms"].dump()
    ours_si, real_si = ours["signer_infos"][0], real["signer_infos"][0]
    for field in ("version", "digest_algorithm", "signature_algorithm"):
        assert ours_si[field].dump() == real_si[field].dump(), field
    assert ours_si["sid"].name == real_si["sid"].name == "issuer_and_serial_number"
    assert ours_si["signed_attrs"].native is None
    assert real_si["signed_attrs"].native is None
    assert ours_si["unsigned_attrs"].native is None
    assert ours_si["digest_algorithm"]["algorithm"].dotted == pki.SHA256_WITH_RSA_OID


def test_signer_info_names_the_signer(rsa_chain: Chain) -> None:
    leaf = rsa_chain[2]
    sd = _signed_data(pki.sign_attested(sample_content(), signer=leaf))
    sid = sd["signer_infos"][0]["sid"].chosen
    assert sid["serial_number"].native == leaf.certificate.serial_number == 3003
    assert sid["issuer"].dump() == leaf.certificate.issuer.public_bytes()
    assert sd["certificates"][0].chosen.dump() == leaf.certificate.public_bytes(serialization.Encoding.DER)


def test_rsa_signature_is_pkcs1v15_over_the_content_digest(rsa_chain: Chain) -> None:
    content = sample_content()
    sd = _signed_data(pki.sign_attested(content, signer=rsa_chain[2]))
    signature = sd["signer_infos"][0]["signature"].native
    public_key = rsa_chain[2].certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, content, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("hash_name", ["sha384", "sha512", "sha1", "md5"])
def test_other_hashes(rsa_chain: Chain, hash_name: str) -> None:
    content = sample_content()
    sd = _signed_data(pki.sign_attested(content, signer=rsa_chain[2], hash_name=hash_name, digest_oid="1.2.3"))
    assert sd["digest_algorithms"][0]["algorithm"].dotted == "1.2.3"
    public_key = rsa_chain[2].certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    algorithm = {"sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha1": hashes.SHA1, "md5": hashes.MD5}
    public_key.verify(sd["signer_infos"][0]["signature"].native, content, padding.PKCS1v15(), algorithm[hash_name]())


def test_unknown_hash_is_refused(rsa_chain: Chain) -> None:
    with pytest.raises(ValueError, match="unknown hash"):
        pki.sign_attested(b"{}", signer=rsa_chain[2], hash_name="whirlpool")


def test_ecdsa_signer(ec_keys: list[ec.EllipticCurvePrivateKey]) -> None:
    leaf = build_chain(ec_keys)[2]
    content = sample_content()
    sd = _signed_data(pki.sign_attested(content, signer=leaf))
    signer_info = sd["signer_infos"][0]
    assert signer_info["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"
    public_key = leaf.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signer_info["signature"].native, content, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="ECDSA"):
        pki.sign_attested(content, signer=leaf, hash_name="md5")


def test_extra_certificates_follow_the_signer(rsa_chain: Chain) -> None:
    root, issuing, leaf = rsa_chain
    sd = _signed_data(
        pki.sign_attested(sample_content(), signer=leaf, extra_certificates=[issuing.certificate, root.certificate])
    )
    subjects = [c.chosen.subject.native["common_name"] for c in sd["certificates"]]
    assert subjects == ["metadata.azure.com", "Test Issuing CA 01", "Test Root"]


def test_signed_attributes_follow_rfc5652(rsa_chain: Chain) -> None:
    content = sample_content()
    signing_time = FIXED_NOW + timedelta(minutes=1)
    sd = _signed_data(
        pki.sign_attested(content, signer=rsa_chain[2], signed_attributes=True, signing_time=signing_time)
    )
    signer_info = sd["signer_infos"][0]
    attributes = {a["type"].native: a["values"][0].native for a in signer_info["signed_attrs"]}
    assert attributes == {
        "content_type": "data",
        "message_digest": hashlib.sha256(content).digest(),
        "signing_time": signing_time,
    }
    # The signature covers the attributes as a universal SET OF (tag 0x31), not the [0] IMPLICIT form.
    signed_bytes = cms.CMSAttributes(list(signer_info["signed_attrs"])).dump()
    assert signed_bytes[0] == 0x31
    public_key = rsa_chain[2].certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signer_info["signature"].native, signed_bytes, padding.PKCS1v15(), hashes.SHA256())


def test_signed_attributes_without_signing_time(rsa_chain: Chain) -> None:
    sd = _signed_data(pki.sign_attested(sample_content(), signer=rsa_chain[2], signed_attributes=True))
    types = {a["type"].native for a in sd["signer_infos"][0]["signed_attrs"]}
    assert types == {"content_type", "message_digest"}


# --- openssl as an independent verifier -------------------------------------------------------------


@pytest.mark.slow
@tools.requires_tool("openssl")
@pytest.mark.parametrize("key_kind", ["rsa", "ec"])
@pytest.mark.parametrize("signed_attributes", [False, True])
def test_openssl_cms_verifies(
    tmp_path: Path,
    rsa_keys: list[rsa.RSAPrivateKey],
    ec_keys: list[ec.EllipticCurvePrivateKey],
    key_kind: str,
    signed_attributes: bool,
) -> None:
    root, issuing, leaf = build_chain(rsa_keys if key_kind == "rsa" else ec_keys)
    content = sample_content()
    document = tmp_path / "document.der"
    document.write_bytes(
        pki.sign_attested(content, signer=leaf, signed_attributes=signed_attributes, signing_time=FIXED_NOW)
    )
    trust = tmp_path / "trust.pem"
    trust.write_bytes(b"".join(c.certificate.public_bytes(serialization.Encoding.PEM) for c in (root, issuing)))
    result = subprocess.run(
        [
            "openssl", "cms", "-verify", "-inform", "DER", "-in", str(document), "-CAfile", str(trust),
            "-purpose", "any", "-attime", str(int(FIXED_NOW.timestamp())),
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == content


# --- certificates -----------------------------------------------------------------------------------


def _real_leaf(real_dir: Path) -> x509.Certificate:
    sd = _signed_data(_real_document(real_dir, REAL_2026))
    return x509.load_der_x509_certificate(sd["certificates"][0].chosen.dump())


def test_leaf_has_the_shape_of_a_real_one(real_dir: Path, rsa_chain: Chain) -> None:
    ours, real = rsa_chain[2].certificate, _real_leaf(real_dir)
    for cert in (ours, real):
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert [n.value for n in names] == ["metadata.azure.com"]
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        ) == ["eastus.metadata.azure.com", "metadata.azure.com"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert key_usage.critical
        assert key_usage.value.digital_signature
        assert key_usage.value.key_encipherment
        assert not key_usage.value.key_cert_sign
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical
        assert not basic.value.ca
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert ours.subject.rfc4514_string() == real.subject.rfc4514_string()


def test_issuing_ca_has_the_shape_of_a_real_one(rsa_chain: Chain) -> None:
    real_path = require(azure_certs_dir() / "intermediates" / "microsoft-azure-rsa-tls-issuing-ca-04.pem",
                        "real issuing CA")
    real = x509.load_pem_x509_certificate(real_path.read_bytes())
    ours = rsa_chain[1].certificate
    for cert in (ours, real):
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical
        assert basic.value.ca
        assert basic.value.path_length == 0
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert key_usage.critical
        assert (key_usage.value.key_cert_sign, key_usage.value.crl_sign, key_usage.value.digital_signature) == (
            True,
            True,
            True,
        )
        assert not key_usage.value.key_encipherment
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_ski = rsa_chain[0].certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ours.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest


def test_intermediate_variants(rsa_chain: Chain, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    root = rsa_chain[0]
    window = {"not_before": FIXED_NOW, "not_after": FIXED_NOW + timedelta(days=1), "serial": 5}
    server_only = pki.make_intermediate(
        common_name="G2", key=rsa_keys[1], issuer=root, eku_server_auth_only=True, **window
    ).certificate
    assert list(server_only.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    not_ca = pki.make_intermediate(
        common_name="X", key=rsa_keys[1], issuer=root, ca=False, path_length=None, **window
    ).certificate
    assert not not_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    deeper = pki.make_intermediate(
        common_name="Y", key=rsa_keys[1], issuer=root, path_length=None, **window
    ).certificate
    assert deeper.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length is None
    with pytest.raises(ValueError, match="path length"):
        pki.make_intermediate(common_name="Z", key=rsa_keys[1], issuer=root, ca=False, **window)


def test_leaf_variants(rsa_chain: Chain, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    window = {"not_before": FIXED_NOW, "not_after": FIXED_NOW + timedelta(days=1), "serial": 7}
    bare = pki.make_leaf(
        dns_names=[], common_name="metadata.azure.com", key=rsa_keys[2], issuer=rsa_chain[1], eku=(), **window
    ).certificate
    with pytest.raises(x509.ExtensionNotFound):
        bare.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(x509.ExtensionNotFound):
        bare.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_validity_must_be_aware_and_ordered(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.make_root(
            common_name="R",
            key=rsa_keys[0],
            not_before=datetime(2026, 1, 1),  # noqa: DTZ001 - the naive instant is the point
            not_after=FIXED_NOW,
            serial=1,
        )
    with pytest.raises(ValueError, match="later"):
        pki.make_root(common_name="R", key=rsa_keys[0], not_before=FIXED_NOW, not_after=FIXED_NOW, serial=1)


# --- determinism ------------------------------------------------------------------------------------


def test_everything_is_deterministic_given_keys_serials_and_times(
    rsa_keys: list[rsa.RSAPrivateKey], ec_keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    for keys in (rsa_keys, ec_keys):
        first, second = build_chain(keys), build_chain(keys)
        for a, b in zip(first, second, strict=True):
            assert a.certificate.public_bytes(serialization.Encoding.DER) == b.certificate.public_bytes(
                serialization.Encoding.DER
            )
        for signed_attributes in (False, True):
            documents = {
                pki.sign_attested(
                    sample_content(),
                    signer=chain[2],
                    signed_attributes=signed_attributes,
                    signing_time=FIXED_NOW,
                    extra_certificates=[chain[1].certificate],
                )
                for chain in (first, second)
            }
            assert len(documents) == 1


# --- a whole PKI and its trust directory ------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_generated_pki_chains_for_tls_server_auth(key_type: str) -> None:
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.us", region="usgovvirginia", now=now,
                                           key_type=key_type)  # type: ignore[arg-type]  # fmt: skip
    verifier = (
        PolicyBuilder()
        .store(Store([root.certificate]))
        .time(now)
        .build_server_verifier(x509.DNSName("usgovvirginia.metadata.azure.us"))
    )
    chain = verifier.verify(leaf.certificate, [issuing.certificate])
    assert chain[-1] == root.certificate
    public_key = leaf.certificate.public_key()
    if key_type == "rsa":
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == pki.RSA_KEY_BITS
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert pki.generate_pki(cloud_domain="x", now=now)[0].certificate != root.certificate


def test_write_pinned_dir_layout(tmp_path: Path, rsa_chain: Chain) -> None:
    root, issuing, _ = rsa_chain
    pki.write_pinned_dir(tmp_path, "public", root=root.certificate, intermediates=[issuing.certificate])
    roots = sorted((tmp_path / "public" / "roots").glob("*.pem"))
    intermediates = sorted((tmp_path / "public" / "intermediates").glob("*.pem"))
    assert len(roots) == 1
    assert len(intermediates) == 1
    assert roots[0].name.startswith("test-root-")
    assert x509.load_pem_x509_certificate(roots[0].read_bytes()) == root.certificate
    assert x509.load_pem_x509_certificate(intermediates[0].read_bytes()) == issuing.certificate
    # Writing again is idempotent: the same certificate lands in the same file.
    pki.write_pinned_dir(tmp_path, "public", root=root.certificate, intermediates=[issuing.certificate])
    assert sorted((tmp_path / "public" / "roots").glob("*.pem")) == roots
