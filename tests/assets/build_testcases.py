#!/usr/bin/env python3
"""Build the deterministic test PKI and attested documents of the verification tests.

Every output is a pure function of the private keys checked in under ``tests/assets/keys/`` and of the
fixed serial numbers and instants below: RSA PKCS#1 v1.5 is deterministic and ECDSA signs with RFC 6979
nonces, so re-running this script gives byte-identical files. The test suite re-runs it into a temporary
directory and fails when the checked-in files drift from what it builds.

Outputs (under ``tests/assets/testcases/`` unless ``--out`` says otherwise):

* ``pinned/<cloud>/roots|intermediates/*.pem``: the trust directory the cases are verified against, and
  ``pinned/public/crls/*.crl``: current CRLs of the root and of the RSA issuing CA (which lists one leaf);
* ``documents/<case>.json`` (or ``.txt`` for bare base64): one input per case, each built from the valid
  base document by changing one thing (a certificate, a field, a byte, the verification instant);
* ``index.json``: per case the expected result (an error code, or ``ok`` with the cloud, the exact claims
  and the signer's fingerprint), the instant to verify at and the policy (cloud, expected nonce, and the
  revocation mode where it is not the default ``soft``).

Keys missing from ``tests/assets/keys/`` are generated once and written there; after that they are reused.

Usage: ``python tests/assets/build_testcases.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attest_service.imds import pki

ASSETS: Final = Path(__file__).resolve().parent
KEYS_DIR: Final = ASSETS / "keys"
DEFAULT_OUT: Final = ASSETS / "testcases"

# --- fixed instants ------------------------------------------------------------------------------------

#: The base document's createdOn; expiresOn is six hours later, as IMDS writes it.
CREATED_ON: Final = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
EXPIRES_ON: Final = CREATED_ON + pki.DOCUMENT_LIFETIME
#: The instant the cases are verified at: one minute after the document was made.
VERIFY_AT: Final = CREATED_ON + timedelta(minutes=1)
#: The verifier's default tolerance (attest_service.verify.verifier.DEFAULT_CLOCK_SKEW), in seconds.
CLOCK_SKEW_SECONDS: Final = 60

ROOT_VALIDITY: Final = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2034, 1, 1, tzinfo=UTC))
CA_VALIDITY: Final = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC))
LEAF_VALIDITY: Final = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
EXPIRED_BEFORE_USE: Final = datetime(2025, 5, 1, tzinfo=UTC)
VALID_AFTER_USE: Final = datetime(2025, 7, 1, tzinfo=UTC)

# --- fixed content -------------------------------------------------------------------------------------

NONCE: Final = "a1b2c3d4e5f60718"
VM_ID: Final = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
SUBSCRIPTION_ID: Final = "11111111-2222-4333-8444-555555555555"
SKU: Final = "20_04-lts-gen2"

PUBLIC: Final = "metadata.azure.com"
USGOV: Final = "metadata.azure.us"
CHINA: Final = "metadata.azure.cn"

OID_SHA256: Final = "2.16.840.1.101.3.4.2.1"
OID_SHA384_RSA: Final = "1.2.840.113549.1.1.12"
OID_SHA512_RSA: Final = "1.2.840.113549.1.1.13"
OID_MD5: Final = "1.2.840.113549.2.5"
OID_SHA1: Final = "1.3.14.3.2.26"
OID_DATA: Final = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
#: id-ct-TSTInfo (RFC 3161): a content type that is not id-data.
OID_TST_INFO: Final = "1.2.840.113549.1.9.16.1.4"

#: Key name -> key type. RSA keys are 2048-bit like Azure's; "ec" keys are P-256. The others are signer keys
#: outside what Azure uses, which the verifier refuses before any RSA operation (see ``NEW_KEYS``).
KEY_TYPES: Final[dict[str, str]] = {
    "root": "rsa",
    "issuing": "rsa",
    "leaf": "rsa",
    "ec-issuing": "ec",
    "ec-leaf": "ec",
    "chain-a": "rsa",
    "chain-b": "rsa",
    "chain-c": "rsa",
    "chain-d": "rsa",
    "expired-issuing": "rsa",
    "unpinned-issuing": "rsa",
    "attacker-root": "rsa",
    "attacker-issuing": "rsa",
    "attacker-leaf": "rsa",
    "ec-p384-leaf": "ec-p384",
    "rsa-1024-leaf": "rsa-1024",
    "rsa-8192-leaf": "rsa-8192",
    "rsa-e3-leaf": "rsa-e3",
    "rsa-huge-exponent-leaf": "rsa-huge-exponent",
    "ec-p521-leaf": "ec-p521",
}


def _rsa_with_exponent(bits: int, exponent_bits: int) -> rsa.RSAPrivateKey:
    """An RSA key whose public exponent has ``exponent_bits`` bits (cryptography generates only 3 and 65537)."""
    primes = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
    p, q = primes.p, primes.q
    carmichael = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    while True:
        e = secrets.randbits(exponent_bits) | (1 << (exponent_bits - 1)) | 1
        if math.gcd(e, carmichael) == 1:
            break
    d = pow(e, -1, carmichael)
    public = rsa.RSAPublicNumbers(e, p * q)
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public).private_key()


#: How a key of each type is made, when it is not checked in yet.
NEW_KEYS: Final[dict[str, Callable[[], pki.SigningKey]]] = {
    "rsa": lambda: pki.new_key("rsa"),
    "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-1024": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    "rsa-8192": lambda: rsa.generate_private_key(public_exponent=65537, key_size=8192),
    "rsa-e3": lambda: rsa.generate_private_key(public_exponent=3, key_size=2048),
    # The costliest key measured: about a hundred RSA-2048 verifications for one signature check.
    "rsa-huge-exponent": lambda: _rsa_with_exponent(3072, 3000),
    "ec-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
}


# --- keys -----------------------------------------------------------------------------------------------


@functools.cache
def load_key(name: str) -> pki.SigningKey:
    """The checked-in private key ``name``; generated and written once when missing."""
    path = KEYS_DIR / f"{name}.pem"
    if not path.exists():
        key = NEW_KEYS[KEY_TYPES[name]]()
        KEYS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path}: not an RSA or EC key")
    return loaded


# --- certificates ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Pki:
    """Every certificate the cases use, genuine and hostile."""

    root: pki.CertifiedKey
    issuing: pki.CertifiedKey
    leaf: pki.CertifiedKey
    ec_issuing: pki.CertifiedKey
    ec_leaf: pki.CertifiedKey
    chain: tuple[pki.CertifiedKey, ...]  # A -> B -> C -> D, A issued by the root
    expired_issuing: pki.CertifiedKey
    unpinned_issuing: pki.CertifiedKey
    attacker_root: pki.CertifiedKey
    attacker_issuing: pki.CertifiedKey
    attacker_leaf: pki.CertifiedKey
    serials: dict[str, int] = field(default_factory=dict)


_serial_counter = iter(range(0x1000, 0x10000))


def _serial() -> int:
    # Successive fixed serial numbers: the build order is fixed, so every run assigns the same ones.
    return next(_serial_counter)


def leaf(issuer: pki.CertifiedKey, *, common_name: str = PUBLIC, dns_names: Sequence[str] | None = None,
         key: str = "leaf", validity: tuple[datetime, datetime] = LEAF_VALIDITY,
         eku: Sequence[x509.ObjectIdentifier] = pki.DEFAULT_LEAF_EKU) -> pki.CertifiedKey:
    """An Azure-shaped signing leaf; by default CN and SAN ``eastus.metadata.azure.com``, ``metadata.azure.com``."""
    names = [f"eastus.{common_name}", common_name] if dns_names is None else list(dns_names)
    return pki.make_leaf(dns_names=names, common_name=common_name, key=load_key(key), issuer=issuer,
                         not_before=validity[0], not_after=validity[1], serial=_serial(), eku=eku)


def intermediate(name: str, issuer: pki.CertifiedKey, *, key: str, path_length: int | None = 0,
                 validity: tuple[datetime, datetime] = CA_VALIDITY) -> pki.CertifiedKey:
    """An Azure-shaped issuing CA."""
    return pki.make_intermediate(common_name=name, key=load_key(key), issuer=issuer, not_before=validity[0],
                                 not_after=validity[1], serial=_serial(), path_length=path_length)


def _leaf_name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Microsoft Corporation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _sign(builder: x509.CertificateBuilder, key: pki.SigningKey) -> x509.Certificate:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    return builder.sign(key, hashes.SHA256())


def self_signed_leaf(key_name: str, *, issuer_name: x509.Name | None = None,
                     serial: int | None = None) -> pki.CertifiedKey:
    """An attacker's own ``metadata.azure.com`` certificate: not a CA, signed with its own key.

    ``issuer_name`` and ``serial`` let it claim another certificate's issuer and serial number.
    """
    key = load_key(key_name)
    subject = _leaf_name(PUBLIC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name if issuer_name is not None else subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else _serial())
        .not_valid_before(LEAF_VALIDITY[0])
        .not_valid_after(LEAF_VALIDITY[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PUBLIC)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return pki.CertifiedKey(certificate=_sign(builder, key), private_key=key)


def ca_leaf(issuer: pki.CertifiedKey) -> pki.CertifiedKey:
    """A ``metadata.azure.com`` certificate that is itself a CA: no end entity may be one."""
    key = load_key("leaf")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_leaf_name(PUBLIC))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(LEAF_VALIDITY[0])
        .not_valid_after(LEAF_VALIDITY[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"eastus.{PUBLIC}"), x509.DNSName(PUBLIC)]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(pki.DEFAULT_LEAF_EKU)), critical=False)
    )
    return pki.CertifiedKey(certificate=_sign(builder, issuer.private_key), private_key=key)


def build_pki() -> Pki:
    """The genuine test PKI (what ``pinned/`` trusts) and the attacker's."""
    root = pki.make_root(common_name="Attest Test Root CA", key=load_key("root"), not_before=ROOT_VALIDITY[0],
                         not_after=ROOT_VALIDITY[1], serial=_serial())
    issuing = intermediate("Attest Test TLS Issuing CA 01", root, key="issuing")
    ec_issuing = intermediate("Attest Test ECC TLS Issuing CA 01", root, key="ec-issuing")
    chain_a = intermediate("Attest Test Chain CA A", root, key="chain-a", path_length=None)
    chain_b = intermediate("Attest Test Chain CA B", chain_a, key="chain-b", path_length=None)
    chain_c = intermediate("Attest Test Chain CA C", chain_b, key="chain-c", path_length=None)
    chain_d = intermediate("Attest Test Chain CA D", chain_c, key="chain-d")
    expired_issuing = intermediate("Attest Test Expired Issuing CA", root, key="expired-issuing",
                                   validity=(CA_VALIDITY[0], EXPIRED_BEFORE_USE))
    unpinned_issuing = intermediate("Attest Test Unpinned Issuing CA", root, key="unpinned-issuing")
    # The attacker copies the genuine root's and issuing CA's names exactly; only the keys differ.
    attacker_root = pki.make_root(common_name="Attest Test Root CA", key=load_key("attacker-root"),
                                  not_before=ROOT_VALIDITY[0], not_after=ROOT_VALIDITY[1], serial=_serial())
    attacker_issuing = intermediate("Attest Test TLS Issuing CA 01", attacker_root, key="attacker-issuing")
    return Pki(
        root=root,
        issuing=issuing,
        leaf=leaf(issuing),
        ec_issuing=ec_issuing,
        ec_leaf=leaf(ec_issuing, key="ec-leaf"),
        chain=(chain_a, chain_b, chain_c, chain_d),
        expired_issuing=expired_issuing,
        unpinned_issuing=unpinned_issuing,
        attacker_root=attacker_root,
        attacker_issuing=attacker_issuing,
        attacker_leaf=leaf(attacker_issuing, key="attacker-leaf"),
    )


# --- documents ------------------------------------------------------------------------------------------


def content(**changes: object) -> bytes:
    """The base signed JSON, compact and in IMDS's key order, with top-level ``changes`` applied."""
    claims: dict[str, object] = json.loads(pki.attested_content(
        nonce=NONCE, vm_id=VM_ID, subscription_id=SUBSCRIPTION_ID, sku=SKU, plan=("", "", ""),
        license_type="", created_on=CREATED_ON, expires_on=EXPIRES_ON))
    for key, value in changes.items():
        if value is None:
            del claims[key]
        else:
            claims[key] = value
    return json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


BASE_CONTENT: Final = content()


def response(der: bytes) -> bytes:
    """The IMDS response object carrying ``der``, as a file holds it."""
    return json.dumps({"encoding": "pkcs7", "signature": base64.b64encode(der).decode("ascii")}).encode()


def sign(signer: pki.CertifiedKey, body: bytes = BASE_CONTENT, **options: object) -> bytes:
    """``pki.sign_attested`` with the generator's defaults (RSA: Azure's digest OID; ECDSA: SHA-256's)."""
    if isinstance(signer.private_key, ec.EllipticCurvePrivateKey):
        options.setdefault("digest_oid", OID_SHA256)
    return pki.sign_attested(body, signer=signer, **options)  # type: ignore[arg-type]


def tlv(tag: int, body: bytes) -> bytes:
    """One DER element with a minimal definite length."""
    if len(body) < 0x80:
        return bytes((tag, len(body))) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER element."""
    from asn1crypto import core  # noqa: PLC0415 - only the DER tweaks need it

    return bytes(core.ObjectIdentifier(dotted).dump())


def signed_data_parts(der: bytes) -> dict[str, bytes]:
    """The exact encodings of a SignedData's fields, for reassembly with one of them changed."""
    signed = cms.ContentInfo.load(der)["content"]
    return {name: bytes(signed[name].dump()) for name in
            ("version", "digest_algorithms", "encap_content_info", "certificates", "signer_infos")}


def assemble(parts: dict[str, bytes]) -> bytes:
    """ContentInfo(SignedData) from field encodings in RFC 5652 order."""
    body = b"".join(parts[name] for name in
                    ("version", "digest_algorithms", "encap_content_info", "certificates", "signer_infos"))
    return tlv(0x30, oid(OID_SIGNED_DATA) + tlv(0xA0, tlv(0x30, body)))


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with the single occurrence of ``old`` replaced by ``new`` (same length, so DER stays valid)."""
    if data.count(old) != 1 or len(old) != len(new):
        raise ValueError("replacement must be unique and keep the length")
    return data.replace(old, new)


def signature_of(der: bytes) -> bytes:
    """The SignerInfo's signature value."""
    return bytes(cms.ContentInfo.load(der)["content"]["signer_infos"][0]["signature"].native)


# --- cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One input file and what verifying it must give."""

    name: str
    description: str
    data: bytes
    expect: str
    at: datetime = VERIFY_AT
    cloud: str = "auto"
    nonce: str | None = None
    revocation: str = "soft"
    expected_cloud: str | None = None
    body: bytes | None = None
    signer: x509.Certificate | None = None
    suffix: str = ".json"


def build_cases(p: Pki) -> list[Case]:
    """Every case, each the valid base document with one thing changed."""
    cases: list[Case] = []

    def ok(name: str, description: str, der: bytes, *, signer: pki.CertifiedKey, expected: str = "public",
           **kwargs: object) -> None:
        kwargs.setdefault("data", response(der))
        cases.append(Case(name=name, description=description, expect="ok", expected_cloud=expected,
                          body=BASE_CONTENT, signer=signer.certificate, **kwargs))  # type: ignore[arg-type]

    def bad(name: str, description: str, data: bytes, expect: str, **kwargs: object) -> None:
        cases.append(Case(name=name, description=description, data=data, expect=expect, **kwargs))  # type: ignore[arg-type]

    base = sign(p.leaf)
    ok("ok-rsa", "the base document: RSA-2048 leaf, Azure's shape", base, signer=p.leaf)
    ok("ok-rsa-explicit-public", "the base document with cloud=public", base, signer=p.leaf, cloud="public")
    ok("ok-rsa-nonce-checked", "the base document with its nonce expected", base, signer=p.leaf, nonce=NONCE)
    ok("ok-ecdsa-p256", "ECDSA P-256 leaf under an ECDSA issuing CA", sign(p.ec_leaf), signer=p.ec_leaf)
    ok("ok-signed-attributes", "signed attributes (contentType, messageDigest, signingTime)",
       sign(p.leaf, signed_attributes=True, signing_time=CREATED_ON), signer=p.leaf)
    chain3 = leaf(p.chain[2])
    ok("ok-three-intermediates", "leaf under three pinned intermediates", sign(chain3), signer=chain3)
    cn_only = leaf(p.issuing, dns_names=[])
    ok("ok-cn-only", "leaf without SAN: the CN names the signer", sign(cn_only), signer=cn_only)
    region_only = leaf(p.issuing, dns_names=[f"eastus.{PUBLIC}"])
    ok("ok-san-region-only", "SAN holds only eastus.metadata.azure.com", sign(region_only), signer=region_only)
    usgov = leaf(p.issuing, common_name=USGOV)
    ok("ok-usgov-auto", "metadata.azure.us signer, cloud auto", sign(usgov), signer=usgov, expected="usgov")
    china = leaf(p.issuing, common_name=CHINA)
    ok("ok-china-auto", "metadata.azure.cn signer, cloud auto", sign(china), signer=china, expected="china")
    ok("ok-sha384", "sha384WithRSAEncryption digest", sign(p.leaf, hash_name="sha384", digest_oid=OID_SHA384_RSA),
       signer=p.leaf)
    ok("ok-sha512", "sha512WithRSAEncryption digest", sign(p.leaf, hash_name="sha512", digest_oid=OID_SHA512_RSA),
       signer=p.leaf)
    skew = timedelta(seconds=CLOCK_SKEW_SECONDS)
    ok("ok-expiry-inside-skew", "verified one second inside the skew after expiresOn", base, signer=p.leaf,
       at=EXPIRES_ON + skew - timedelta(seconds=1))
    ok("ok-creation-inside-skew", "verified one second inside the skew before createdOn", base, signer=p.leaf,
       at=CREATED_ON - skew + timedelta(seconds=1))

    # Algorithms and structure outside what is supported.
    bad("md5-digest", "MD5 digest", response(sign(p.leaf, hash_name="md5", digest_oid=OID_MD5)),
        "unsupported_document")
    bad("sha1-digest", "SHA-1 digest", response(sign(p.leaf, hash_name="sha1", digest_oid=OID_SHA1)),
        "unsupported_document")
    parts = signed_data_parts(base)
    bad("detached-content", "eContent removed", response(assemble({**parts, "encap_content_info": tlv(
        0x30, oid(OID_DATA))})), "unsupported_document")
    inner = bytes(cms.ContentInfo.load(base)["content"]["signer_infos"][0].dump())
    bad("two-signer-infos", "the SignerInfo twice", response(assemble({**parts, "signer_infos": tlv(
        0x31, inner + inner)})), "unsupported_document")
    econtent = cms.ContentInfo.load(base)["content"]["encap_content_info"]["content"].dump()
    bad("non-data-content-type", "eContentType id-ct-TSTInfo", response(assemble({**parts, "encap_content_info": tlv(
        0x30, oid(OID_TST_INFO) + econtent)})), "unsupported_document")

    # Signatures.
    signature = signature_of(base)
    flipped = signature[:-1] + bytes((signature[-1] ^ 0x01,))
    bad("wrong-signature", "last signature byte flipped", response(replace_once(base, signature, flipped)),
        "signature_invalid")
    changed = BASE_CONTENT.replace(VM_ID.encode(), b"1" + VM_ID[1:].encode())
    bad("content-changed", "one vmId character changed after signing",
        response(replace_once(base, BASE_CONTENT, changed)), "signature_invalid")
    other = sign(p.leaf, changed, signed_attributes=True, signing_time=CREATED_ON)
    bad("signed-attributes-wrong-digest", "messageDigest of other content",
        response(replace_once(other, changed, BASE_CONTENT)), "signature_invalid")

    # Attacks.
    own = self_signed_leaf("attacker-leaf")
    bad("attack-own-cert-first", "attacker's self-signed cert first and named by the SignerInfo; genuine leaf present",
        response(sign(own, extra_certificates=[p.leaf.certificate])), "untrusted_chain")
    twin = self_signed_leaf("attacker-leaf", issuer_name=p.leaf.certificate.issuer,
                            serial=p.leaf.certificate.serial_number)
    bad("attack-sid-collision", "attacker's cert claims the genuine leaf's issuer and serial, placed first",
        response(sign(twin, extra_certificates=[p.leaf.certificate])), "malformed_document")
    forged = pki.CertifiedKey(certificate=p.leaf.certificate, private_key=load_key("attacker-leaf"))
    bad("attack-genuine-sid-attacker-key", "SignerInfo names the genuine leaf, attacker's key signed",
        response(sign(forged)), "signature_invalid")
    bad("attack-lookalike-chain", "attacker root and issuing CA with the pinned names, carried in the document",
        response(sign(p.attacker_leaf, extra_certificates=[p.attacker_issuing.certificate,
                                                            p.attacker_root.certificate])), "untrusted_chain")
    for name, slug in (("metadata.azure.com.evil.com", "suffix-appended"), ("evilmetadata.azure.com", "prefix-glued"),
                       ("metadata-azure.com", "hyphen"), ("metadata.azure.co", "tld-cut"),
                       ("xn--mtadata-2fg.azure.com", "punycode-homoglyph"),
                       ("metadata.azure.com.", "trailing-dot")):
        lookalike = leaf(p.issuing, common_name=name, dns_names=[name])
        bad(f"name-{slug}", f"signer named {name}", response(sign(lookalike)), "subject_mismatch")
    homoglyph = leaf(p.issuing, common_name="m\u0435tadata.azure.com", dns_names=[])
    bad("name-unicode-homoglyph-cn", "CN-only signer with a Cyrillic e", response(sign(homoglyph)), "subject_mismatch")
    wrong_san = leaf(p.issuing, dns_names=["www.example.com"])
    bad("name-san-wrong-cn-right", "SAN www.example.com, CN metadata.azure.com", response(sign(wrong_san)),
        "subject_mismatch")
    bad("cloud-usgov-for-public-signer", "the base document with cloud=usgov", response(base), "subject_mismatch",
        cloud="usgov")

    # Chains.
    chain4 = leaf(p.chain[3])
    bad("four-intermediates", "leaf under four pinned intermediates", response(sign(chain4)), "untrusted_chain")
    code_signing = leaf(p.issuing, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    bad("leaf-eku-code-signing", "leaf EKU codeSigning only", response(sign(code_signing)), "untrusted_chain")
    bad("leaf-is-ca", "leaf with basicConstraints CA", response(sign(ca_leaf(p.issuing))), "untrusted_chain")
    expired = leaf(p.issuing, validity=(datetime(2024, 6, 1, tzinfo=UTC), EXPIRED_BEFORE_USE))
    bad("leaf-expired", "leaf expired a month before", response(sign(expired)), "certificate_expired")
    future = leaf(p.issuing, validity=(VALID_AFTER_USE, datetime(2026, 7, 1, tzinfo=UTC)))
    bad("leaf-not-yet-valid", "leaf valid from a month later", response(sign(future)), "certificate_expired")
    under_expired = leaf(p.expired_issuing)
    bad("intermediate-expired", "pinned issuing CA expired a month before", response(sign(under_expired)),
        "certificate_expired")
    unpinned = leaf(p.unpinned_issuing)
    bad("intermediate-not-pinned", "issuing CA not pinned, carried in the document",
        response(sign(unpinned, extra_certificates=[p.unpinned_issuing.certificate])), "untrusted_chain")

    # Time and nonce.
    bad("document-expired", "verified one second beyond the skew after expiresOn", response(base),
        "document_expired", at=EXPIRES_ON + skew + timedelta(seconds=1))
    bad("document-not-yet-valid", "verified one second beyond the skew before createdOn", response(base),
        "document_not_yet_valid", at=CREATED_ON - skew - timedelta(seconds=1))
    bad("nonce-mismatch", "the base document with another nonce expected", response(base), "nonce_mismatch",
        nonce="another-nonce")

    # Signed content IMDS would not have produced (each validly signed).
    text = BASE_CONTENT.decode()
    stamp = {"createdOn": pki.imds_timestamp(CREATED_ON), "expiresOn": pki.imds_timestamp(EXPIRES_ON)}
    malformed_content: list[tuple[str, str, bytes]] = [
        ("content-not-json", "content is not JSON", b"nonce=" + NONCE.encode()),
        ("content-not-object", "content is a JSON array", b"[" + BASE_CONTENT + b"]"),
        ("content-not-utf8", "content is Latin-1", BASE_CONTENT.replace(SKU.encode(), b"\xe9" + SKU[1:].encode())),
        ("content-duplicate-key", "vmId twice", (text[:-1] + f',"vmId":"{VM_ID}"}}').encode()),
        ("content-number-value", "sku is a number", content(sku=2004)),
        ("content-null-value", "licenseType is null", BASE_CONTENT.replace(b'"licenseType":""', b'"licenseType":null')),
        ("timestamp-iso8601", "createdOn in ISO 8601",
         content(timeStamp={**stamp, "createdOn": "2025-06-01T12:00:00Z"})),
        ("timestamp-four-digit-year", "createdOn with a four-digit year",
         content(timeStamp={**stamp, "createdOn": "06/01/2025 12:00:00 -0000"})),
        ("timestamp-plus-offset", "createdOn with +0000",
         content(timeStamp={**stamp, "createdOn": "06/01/25 12:00:00 +0000"})),
        ("timestamp-impossible-date", "expiresOn on February 30th",
         content(timeStamp={**stamp, "expiresOn": "02/30/25 18:00:00 -0000"})),
        ("timestamp-expires-before-created", "expiresOn before createdOn",
         content(timeStamp={"createdOn": stamp["expiresOn"], "expiresOn": stamp["createdOn"]})),
        ("timestamp-missing-expires", "expiresOn absent", content(timeStamp={"createdOn": stamp["createdOn"]})),
        ("timestamp-not-object", "timeStamp is a string", content(timeStamp=stamp["createdOn"])),
        ("vmid-missing", "vmId absent", content(vmId=None)),
        ("nonce-missing", "nonce absent", content(nonce=None)),
    ]
    for name, description, body in malformed_content:
        bad(name, description, response(sign(p.leaf, body)), "malformed_document")

    # DER.
    bad("der-trailing-bytes", "one byte after the ContentInfo", response(base + b"\x00"), "malformed_document")
    if base[:2] != b"\x30\x82":
        raise ValueError("the base document is expected to have a two-octet length")
    bad("der-indefinite-length", "outer SEQUENCE in BER indefinite form",
        response(b"\x30\x80" + base[4:] + b"\x00\x00"), "malformed_document")
    bad("der-non-minimal-length", "outer length in three octets",
        response(b"\x30\x83\x00" + base[2:]), "malformed_document")
    bad("der-truncated", "last 16 bytes cut", response(base[:-16]), "malformed_document")

    # Input forms.
    encoded = base64.b64encode(base).decode("ascii")
    bad("input-bad-base64", "a character outside the base64 alphabet",
        json.dumps({"encoding": "pkcs7", "signature": encoded[:100] + "!" + encoded[101:]}).encode(),
        "malformed_document")
    bad("input-encoding-base64", "response whose encoding is base64",
        json.dumps({"encoding": "base64", "signature": encoded}).encode(), "unsupported_document")
    bad("input-missing-signature", "response without signature", b'{"encoding": "pkcs7"}', "malformed_document")
    bad("input-duplicate-key", "response with signature twice",
        f'{{"encoding": "pkcs7", "signature": "{encoded}", "signature": "{encoded}"}}'.encode(), "malformed_document")
    ok("ok-bare-base64", "the base document as bare base64 text", base, signer=p.leaf,
       data=encoded.encode() + b"\n", suffix=".txt")

    # Signer keys. The signature is checked before the chain, so the key is the document's choice; keys
    # outside what Azure uses are refused before the RSA operation (each leaf is issued by a pinned CA).
    p384 = leaf(p.ec_issuing, key="ec-p384-leaf")
    ok("ok-ecdsa-p384", "ECDSA P-384 leaf under an ECDSA issuing CA", sign(p384), signer=p384)
    for key_name, description in (("rsa-1024-leaf", "RSA-1024 leaf"), ("rsa-8192-leaf", "RSA-8192 leaf"),
                                  ("rsa-e3-leaf", "RSA-2048 leaf with public exponent 3"),
                                  ("rsa-huge-exponent-leaf", "RSA-3072 leaf with a 3000-bit public exponent"),
                                  ("ec-p521-leaf", "ECDSA P-521 leaf")):
        odd = leaf(p.ec_issuing if key_name.startswith("ec-") else p.issuing, key=key_name)
        bad(f"key-{key_name.removesuffix('-leaf')}", description, response(sign(odd)), "unsupported_document")
    huge = leaf(p.issuing, key="rsa-huge-exponent-leaf")
    huge_document = sign(huge)
    huge_signature = signature_of(huge_document)
    # Were the key checked only by the RSA operation, this would be signature_invalid.
    bad("key-rsa-huge-exponent-bad-signature", "RSA-3072 leaf with a 3000-bit exponent and a flipped signature byte",
        response(replace_once(huge_document, huge_signature,
                              huge_signature[:-1] + bytes((huge_signature[-1] ^ 0x01,)))), "unsupported_document")
    # Revocation (built last, so that every certificate above keeps its serial number). The RSA issuing CA's
    # CRL lists this leaf; the root's lists nothing; the ECDSA issuing CA has no CRL.
    revoked = leaf(p.issuing)
    p.serials["revoked-leaf"] = revoked.certificate.serial_number
    bad("revoked-leaf", "leaf listed in its issuing CA's current CRL", response(sign(revoked)),
        "certificate_revoked")
    ok("ok-revocation-hard", "the base document in hard revocation: both CRLs on its path are current", base,
       signer=p.leaf, revocation="hard")
    bad("revocation-unknown-hard", "ECDSA leaf in hard revocation: its issuing CA publishes no CRL",
        response(sign(p.ec_leaf)), "revocation_unknown", revocation="hard")
    return cases


def write_crls(directory: Path, p: Pki) -> None:
    """The CRLs of ``pinned/public/crls``: the root's (empty) and the RSA issuing CA's (listing the revoked leaf)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, ca, revoked in (("attest-test-root-ca.crl", p.root, ()),
                              ("attest-test-tls-issuing-ca-01.crl", p.issuing, (p.serials["revoked-leaf"],))):
        builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
                   .last_update(CREATED_ON - timedelta(days=1)).next_update(CREATED_ON + timedelta(days=30))
                   .add_extension(x509.CRLNumber(1), critical=False))
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(CREATED_ON - timedelta(days=2))
                .build())
        crl = builder.sign(ca.private_key, hashes.SHA256())  # RSA PKCS#1 v1.5: the same bytes every run
        (directory / name).write_bytes(crl.public_bytes(serialization.Encoding.DER))


# --- output ---------------------------------------------------------------------------------------------


def write(out: Path) -> None:
    """Build everything into ``out`` (replacing its documents, trust and index)."""
    p = build_pki()
    cases = build_cases(p)
    for sub in ("pinned", "documents"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "documents").mkdir(parents=True)
    pinned = [p.issuing, p.ec_issuing, *p.chain, p.expired_issuing]
    for cloud in ("public", "usgov", "china"):
        pki.write_pinned_dir(out / "pinned", cloud, root=p.root.certificate,
                             intermediates=[ca.certificate for ca in pinned])
    write_crls(out / "pinned" / "public" / "crls", p)
    index: dict[str, object] = {}
    names: set[str] = set()
    for case in cases:
        if case.name in names:
            raise ValueError(f"duplicate case {case.name}")
        names.add(case.name)
        filename = f"documents/{case.name}{case.suffix}"
        (out / filename).write_bytes(case.data)
        entry: dict[str, object] = {
            "description": case.description,
            "file": filename,
            "at": case.at.isoformat(),
            "policy": {"cloud": case.cloud, "nonce": case.nonce},
            "expect": case.expect,
        }
        if case.revocation != "soft":
            entry["policy"] = {"cloud": case.cloud, "nonce": case.nonce, "revocation": case.revocation}
        if case.expect == "ok":
            assert case.body is not None  # set by ok()
            assert case.signer is not None
            entry["cloud"] = case.expected_cloud
            entry["claims"] = json.loads(case.body)
            entry["signer_sha256"] = case.signer.fingerprint(hashes.SHA256()).hex()
        index[case.name] = entry
    (out / "index.json").write_text(json.dumps({"cases": index}, indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
