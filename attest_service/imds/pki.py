"""Build certificates and attested documents shaped exactly like the ones Azure IMDS produces.

Everything here is a pure function of its arguments (keys, serial numbers, instants), so a fixture
generator that passes fixed keys and times gets byte-identical output on every run. The only I/O is
:func:`write_pinned_dir`, which the caller invokes explicitly.

The shapes copy real documents fetched from ``/metadata/attested/document`` (2019-2026):

* the PKCS#7 is a CMS ``ContentInfo`` holding ``SignedData`` version 1 (RFC 5652 section 5.1);
* ``digestAlgorithms`` and the SignerInfo ``digestAlgorithm`` hold the *signature* OID
  sha256WithRSAEncryption (1.2.840.113549.1.1.11) with NULL parameters, not the SHA-256 OID;
* the encapsulated content type is id-data and the content (compact JSON) is embedded;
* ``certificates`` holds the signer only, never the intermediates;
* one SignerInfo, version 1, identified by issuer and serial number, ``signatureAlgorithm``
  rsaEncryption with NULL parameters, no signed attributes: the RSA PKCS#1 v1.5 signature is computed
  over the SHA-256 digest of the content itself;
* the signer is ``CN=metadata.azure.com`` with SAN ``<region>.metadata.azure.com`` and
  ``metadata.azure.com``, EKU serverAuth+clientAuth, keyUsage digitalSignature+keyEncipherment;
* the issuing CA has basicConstraints CA with pathLenConstraint 0, keyUsage
  keyCertSign+cRLSign+digitalSignature, and subject/authority key identifiers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: A private key that can sign certificates and documents here.
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: The OID Azure puts in the digestAlgorithm fields: sha256WithRSAEncryption (RFC 8017 appendix A.2.4).
SHA256_WITH_RSA_OID: Final = "1.2.840.113549.1.1.11"

#: rsaEncryption (RFC 8017 appendix A.1): Azure's SignerInfo signatureAlgorithm.
RSA_ENCRYPTION_OID: Final = "1.2.840.113549.1.1.1"

#: Prefix of the PKCS#1 OID arc; Azure encodes these algorithm identifiers with explicit NULL parameters.
_PKCS1_ARC: Final = "1.2.840.113549.1.1."

#: RSA modulus size of freshly generated keys, in bits (what Azure's leaves and issuing CAs use).
RSA_KEY_BITS: Final = 2048

#: The public exponent every modern RSA key uses (RFC 8017 recommends 65537).
RSA_PUBLIC_EXPONENT: Final = 65537

#: Lifetime of an attested document: Azure sets ``expiresOn`` six hours after ``createdOn``.
DOCUMENT_LIFETIME: Final = timedelta(hours=6)

#: Backdating of generated certificates, so a verifier whose clock lags a little still accepts them.
CERTIFICATE_BACKDATE: Final = timedelta(days=1)

#: Validity of generated certificates, counted from ``now``.
ROOT_VALIDITY: Final = timedelta(days=3650)
ISSUING_CA_VALIDITY: Final = timedelta(days=1095)
LEAF_VALIDITY: Final = timedelta(days=365)

#: The timestamp format of ``timeStamp.createdOn``/``expiresOn`` in IMDS documents.
IMDS_TIMESTAMP_FORMAT: Final = "%m/%d/%y %H:%M:%S -0000"


#: Hashes a document can be signed with; md5 and sha1 exist only to build refused test vectors.
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

#: ECDSA signature algorithm per hash (RFC 5758 section 3.2); asn1crypto names.
_ECDSA_SIGNATURE_ALGORITHMS: Final[dict[str, str]] = {
    "sha1": "sha1_ecdsa",
    "sha224": "sha224_ecdsa",
    "sha256": "sha256_ecdsa",
    "sha384": "sha384_ecdsa",
    "sha512": "sha512_ecdsa",
}

#: The name attributes Azure's CAs carry besides the common name.
_CA_NAME_PREFIX: Final = (
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Microsoft Corporation"),
)

#: The name attributes Azure's signing leaves carry besides the common name.
_LEAF_NAME_PREFIX: Final = (
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "WA"),
    x509.NameAttribute(NameOID.LOCALITY_NAME, "Redmond"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Microsoft Corporation"),
)

#: The leaf EKU of Azure's signing certificates.
DEFAULT_LEAF_EKU: Final = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertifiedKey:
    """A certificate and the private key matching its public key."""

    certificate: x509.Certificate
    private_key: SigningKey


# --- certificates ---------------------------------------------------------------------------------


def _sign_certificate(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    # Deterministic ECDSA (RFC 6979) keeps generated fixtures byte-identical across runs; RSA PKCS#1 v1.5
    # is deterministic by construction.
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    return builder.sign(key, hashes.SHA256())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _check_validity(not_before: datetime, not_after: datetime) -> None:
    if not_before.tzinfo is None or not_after.tzinfo is None:
        raise ValueError("certificate validity instants must be timezone-aware")
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")


def make_root(
    *, common_name: str, key: SigningKey, not_before: datetime, not_after: datetime, serial: int
) -> CertifiedKey:
    """Build a self-signed root CA (basicConstraints CA without path length, keyCertSign+cRLSign).

    Raises :class:`ValueError` for naive or inverted validity instants.
    """
    _check_validity(not_before, not_after)
    name = x509.Name([*_CA_NAME_PREFIX, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject=name, issuer=name, key=key, serial=serial, not_before=not_before, not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return CertifiedKey(certificate=_sign_certificate(builder, key), private_key=key)


def make_intermediate(
    *,
    common_name: str,
    key: SigningKey,
    issuer: CertifiedKey,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    path_length: int | None = 0,
    eku_server_auth_only: bool = False,
    ca: bool = True,
) -> CertifiedKey:
    """Build an issuing CA certificate signed by ``issuer``, shaped like Azure's issuing CAs.

    ``eku_server_auth_only`` reproduces the Microsoft TLS G2 intermediates, whose EKU lists serverAuth
    only. ``ca=False`` marks the certificate as not a CA (basicConstraints CA false) and changes nothing
    else, for tests of a verifier that must refuse it as an intermediate. Raises :class:`ValueError`
    for naive or inverted validity instants, or a path length on a non-CA.
    """
    _check_validity(not_before, not_after)
    if not ca and path_length is not None:
        raise ValueError("a certificate that is not a CA cannot carry a path length")
    eku = (
        [ExtendedKeyUsageOID.SERVER_AUTH]
        if eku_server_auth_only
        else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    builder = (
        _builder(subject=x509.Name([*_CA_NAME_PREFIX, x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                 issuer=issuer.certificate.subject, key=key, serial=serial, not_before=not_before,
                 not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    )
    return CertifiedKey(certificate=_sign_certificate(builder, issuer.private_key), private_key=key)


def make_leaf(
    *,
    dns_names: Sequence[str],
    common_name: str,
    key: SigningKey,
    issuer: CertifiedKey,
    not_before: datetime,
    not_after: datetime,
    serial: int,
    eku: Sequence[x509.ObjectIdentifier] = DEFAULT_LEAF_EKU,
) -> CertifiedKey:
    """Build a document-signing leaf shaped like Azure's ``metadata.azure.com`` certificates.

    An empty ``dns_names`` leaves the SAN extension out (so only the CN names the signer); an empty
    ``eku`` leaves the EKU extension out. Raises :class:`ValueError` for naive or inverted validity.
    """
    _check_validity(not_before, not_after)
    # keyEncipherment only means something for RSA keys; an ECDSA leaf gets digitalSignature alone.
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        _builder(subject=x509.Name([*_LEAF_NAME_PREFIX, x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                 issuer=issuer.certificate.subject, key=key, serial=serial, not_before=not_before,
                 not_after=not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False
        )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return CertifiedKey(certificate=_sign_certificate(builder, issuer.private_key), private_key=key)


def _builder(*, subject: x509.Name, issuer: x509.Name, key: SigningKey, serial: int, not_before: datetime,
             not_after: datetime) -> x509.CertificateBuilder:
    """The part every certificate here shares; callers add their extensions in Azure's order."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _authority_key_identifier(issuer: CertifiedKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --- documents ------------------------------------------------------------------------------------


def imds_timestamp(dt: datetime) -> str:
    """Format an aware instant as IMDS does in ``timeStamp``: ``MM/DD/YY HH:MM:SS -0000`` in UTC.

    Raises :class:`ValueError` for a naive datetime, whose meaning would depend on the host's zone.
    """
    if dt.tzinfo is None:
        raise ValueError("IMDS timestamps are built from timezone-aware instants only")
    return dt.astimezone(UTC).strftime(IMDS_TIMESTAMP_FORMAT)


def default_nonce(expires_on: datetime) -> str:
    """The nonce IMDS signs when the caller passes none: the expiry instant as ``YYYYMMDD-HHMMSS`` (UTC)."""
    if expires_on.tzinfo is None:
        raise ValueError("the expiry instant must be timezone-aware")
    return expires_on.astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def attested_content(
    *,
    nonce: str,
    vm_id: str,
    subscription_id: str,
    sku: str,
    plan: tuple[str, str, str],
    license_type: str,
    created_on: datetime,
    expires_on: datetime,
) -> bytes:
    """The signed JSON of an attested document, compact and with keys in the order IMDS emits them.

    ``plan`` is ``(name, product, publisher)``. Raises :class:`ValueError` for naive instants.
    """
    name, product, publisher = plan
    claims = {
        "licenseType": license_type,
        "nonce": nonce,
        "plan": {"name": name, "product": product, "publisher": publisher},
        "sku": sku,
        "subscriptionId": subscription_id,
        "timeStamp": {"createdOn": imds_timestamp(created_on), "expiresOn": imds_timestamp(expires_on)},
        "vmId": vm_id,
    }
    return json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _algorithm_identifier(oid: str) -> dict[str, object]:
    # Azure writes explicit NULL parameters for the PKCS#1 algorithms (as RFC 8017 requires); digest OIDs
    # from NIST's arc are written without parameters, as RFC 5754 section 2 prefers.
    if oid.startswith(_PKCS1_ARC):
        return {"algorithm": oid, "parameters": core.Null()}
    return {"algorithm": oid}


def _sign_bytes(data: bytes, key: SigningKey, hash_name: str) -> tuple[bytes, dict[str, object]]:
    """Sign ``data``; return the signature and the SignerInfo signatureAlgorithm for it."""
    algorithm = _HASHES[hash_name]()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(data, padding.PKCS1v15(), algorithm)
        return signature, _algorithm_identifier(RSA_ENCRYPTION_OID)
    if hash_name not in _ECDSA_SIGNATURE_ALGORITHMS:
        raise ValueError(f"ECDSA has no signature algorithm identifier for {hash_name}")
    signature = key.sign(data, ec.ECDSA(algorithm, deterministic_signing=True))
    return signature, {"algorithm": _ECDSA_SIGNATURE_ALGORITHMS[hash_name]}


def _certificate_set(ders: Sequence[bytes]) -> cms.CertificateSet:
    """The ``certificates`` field holding ``ders`` in the given order.

    DER orders a SET OF by encoding, and asn1crypto would sort it; attack tests need to choose which
    certificate comes first (a verifier must follow the SignerInfo, not the order), and BER allows any
    order, so the set is parsed from an encoding built here and asn1crypto keeps its bytes.
    """
    body = b"".join(ders)
    return cms.CertificateSet.load(core.SetOf(contents=body).dump())


def sign_attested(
    content: bytes,
    *,
    signer: CertifiedKey,
    digest_oid: str = SHA256_WITH_RSA_OID,
    extra_certificates: Sequence[x509.Certificate] = (),
    signed_attributes: bool = False,
    hash_name: str = "sha256",
    signing_time: datetime | None = None,
) -> bytes:
    """Sign ``content`` the way IMDS does and return the DER ``ContentInfo(SignedData)``.

    ``digest_oid`` is written into both digestAlgorithm fields (Azure: sha256WithRSAEncryption);
    ``hash_name`` is the hash actually computed. ``extra_certificates`` are appended after the signer
    (Azure sends none; attack tests use them). With ``signed_attributes`` the SignerInfo carries RFC 5652
    section 11 attributes (contentType, messageDigest and, when ``signing_time`` is given, signingTime)
    and the signature covers their DER ``SET OF`` encoding (RFC 5652 section 5.4). Raises
    :class:`ValueError` for an unknown hash or one ECDSA cannot name.
    """
    if hash_name not in _HASHES:
        raise ValueError(f"unknown hash {hash_name!r}")
    signer_certificate = asn1_x509.Certificate.load(signer.certificate.public_bytes(serialization.Encoding.DER))
    signer_info: dict[str, object] = {
        "version": "v1",
        "sid": cms.SignerIdentifier(
            name="issuer_and_serial_number",
            value={
                "issuer": signer_certificate.issuer,
                "serial_number": signer_certificate.serial_number,
            },
        ),
        "digest_algorithm": algos.DigestAlgorithm(_algorithm_identifier(digest_oid)),
    }
    if signed_attributes:
        attributes = [
            {"type": "content_type", "values": ["data"]},
            {"type": "message_digest", "values": [hashlib.new(hash_name, content).digest()]},
        ]
        if signing_time is not None:
            attributes.append({"type": "signing_time", "values": [cms.Time({"utc_time": signing_time})]})
        attribute_set = cms.CMSAttributes(attributes)
        # The signature covers the attributes re-tagged as a universal SET OF, not the [0] IMPLICIT
        # encoding they have inside SignerInfo (RFC 5652 section 5.4).
        signature, signature_algorithm = _sign_bytes(attribute_set.dump(), signer.private_key, hash_name)
        signer_info["signed_attrs"] = attribute_set
    else:
        signature, signature_algorithm = _sign_bytes(content, signer.private_key, hash_name)
    signer_info["signature_algorithm"] = cms.SignedDigestAlgorithm(signature_algorithm)
    signer_info["signature"] = signature

    certificates = _certificate_set(
        [signer.certificate.public_bytes(serialization.Encoding.DER)]
        + [extra.public_bytes(serialization.Encoding.DER) for extra in extra_certificates]
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm(_algorithm_identifier(digest_oid))],
            "encap_content_info": {"content_type": "data", "content": content},
            "certificates": certificates,
            "signer_infos": [cms.SignerInfo(signer_info)],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump())


# --- trust material -------------------------------------------------------------------------------


def _pem_filename(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else "certificate"
    slug = re.sub(r"[^a-z0-9]+", "-", common_name.lower()).strip("-") or "certificate"
    fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
    # The fingerprint prefix keeps successive PKIs with the same names from overwriting each other.
    return f"{slug}-{fingerprint[:16]}.pem"


def write_pinned_dir(
    directory: Path, cloud: str, *, root: x509.Certificate, intermediates: Sequence[x509.Certificate]
) -> None:
    """Write ``root`` and ``intermediates`` as PEM into ``directory/<cloud>/roots`` and ``.../intermediates``.

    This is the layout ``ATTEST_PINNED_CERTS`` points at. Existing files are left in place; directories
    are created as needed. Raises :class:`OSError` when the files cannot be written.
    """
    roots_dir = directory / cloud / "roots"
    intermediates_dir = directory / cloud / "intermediates"
    roots_dir.mkdir(parents=True, exist_ok=True)
    intermediates_dir.mkdir(parents=True, exist_ok=True)
    (roots_dir / _pem_filename(root)).write_bytes(root.public_bytes(serialization.Encoding.PEM))
    for certificate in intermediates:
        (intermediates_dir / _pem_filename(certificate)).write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
        )


# --- a whole PKI ----------------------------------------------------------------------------------


def new_key(key_type: Literal["rsa", "ec"] = "rsa") -> SigningKey:
    """Generate a fresh private key: 2048-bit RSA, or ECDSA on P-256."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def generate_pki(
    *, cloud_domain: str, region: str = "eastus", now: datetime, key_type: Literal["rsa", "ec"] = "rsa"
) -> tuple[CertifiedKey, CertifiedKey, CertifiedKey]:
    """Generate a fresh Azure-shaped PKI: ``(root, issuing_ca, leaf)`` valid around ``now``.

    The leaf is ``CN=<cloud_domain>`` with SAN ``<region>.<cloud_domain>`` and ``<cloud_domain>``, as
    Azure's signers are. Keys and serial numbers are random, so every call gives a new PKI.
    """
    start = now - CERTIFICATE_BACKDATE
    root = make_root(
        common_name="Attest Emulator Root CA",
        key=new_key(key_type),
        not_before=start,
        not_after=now + ROOT_VALIDITY,
        serial=x509.random_serial_number(),
    )
    issuing_ca = make_intermediate(
        common_name="Attest Emulator TLS Issuing CA 01",
        key=new_key(key_type),
        issuer=root,
        not_before=start,
        not_after=now + ISSUING_CA_VALIDITY,
        serial=x509.random_serial_number(),
    )
    leaf = make_leaf(
        dns_names=[f"{region}.{cloud_domain}", cloud_domain],
        common_name=cloud_domain,
        key=new_key(key_type),
        issuer=issuing_ca,
        not_before=start,
        not_after=now + LEAF_VALIDITY,
        serial=x509.random_serial_number(),
    )
    return root, issuing_ca, leaf
