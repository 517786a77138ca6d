"""Building CRLs for tests and benchmarks: signed by a generated CA's key, as DER or PEM, small or very large.

``make_crl`` uses cryptography's CertificateRevocationListBuilder, whose cost grows with the square of the
entries (fine for a few hundred). ``make_large_crl`` writes the same structure with asn1crypto and signs it
with the CA's key, in seconds for 100,000 entries, for the benchmark and the load tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attest_service.imds import pki

DAY = timedelta(days=1)


def make_crl(issuer: pki.CertifiedKey, *, revoked: Iterable[int] = (), now: datetime,
             this_update: datetime | None = None, next_update: datetime | None = None,
             key: pki.SigningKey | None = None, number: int = 1,
             extensions: Sequence[tuple[x509.ExtensionType, bool]] = ()) -> x509.CertificateRevocationList:
    """A CRL naming ``issuer`` as its issuer, listing ``revoked`` serials, signed by ``key`` (default: the issuer's).

    Current from ``this_update`` (default: an hour before ``now``) to ``next_update`` (default: a week after).
    """
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer.certificate.subject)
               .last_update(this_update or now - timedelta(hours=1))
               .next_update(next_update or now + 7 * DAY)
               .add_extension(x509.CRLNumber(number), critical=False))
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(hours=2))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False).build())
    return builder.sign(key or issuer.private_key, hashes.SHA256())


def der(crl: x509.CertificateRevocationList) -> bytes:
    """The DER encoding of ``crl``."""
    return crl.public_bytes(serialization.Encoding.DER)


def pem(crl: x509.CertificateRevocationList) -> bytes:
    """The PEM encoding of ``crl``."""
    return crl.public_bytes(serialization.Encoding.PEM)


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (X.690 8.1): tag, definite length, content."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


def _integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def make_large_crl(issuer: pki.CertifiedKey, *, entries: int, now: datetime, revoked: Iterable[int] = (),
                   next_update: datetime | None = None) -> bytes:
    """DER of a CRL of ``issuer`` with ``entries`` random serials (plus ``revoked``), each with a reason code.

    Shaped like an issuing CA's CRL: a revocation date and a CRL reason per entry, a CRL number and the
    authority key identifier. The entries are encoded here directly (asn1crypto and cryptography's builder
    both take minutes for 100,000); the rest of the structure is asn1crypto's.
    """
    when = asn1_x509.Time({"utc_time": now - timedelta(hours=2)}).dump()
    reason = asn1_crl.CRLEntryExtensions([{"extn_id": "crl_reason", "critical": False,
                                           "extn_value": "key_compromise"}]).dump()
    serials = [*revoked, *(x509.random_serial_number() for _ in range(entries))]
    revoked_certificates = _tlv(0x30, b"".join(_tlv(0x30, _integer(serial) + when + reason) for serial in serials))
    algorithm = {"algorithm": "sha256_ecdsa" if isinstance(issuer.private_key, ec.EllipticCurvePrivateKey)
                 else "sha256_rsa"}
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    extensions = asn1_crl.TbsCertList({
        "crl_extensions": [{"extn_id": "crl_number", "critical": False, "extn_value": 1},
                           {"extn_id": "authority_key_identifier", "critical": False,
                            "extn_value": {"key_identifier": ski}}]})["crl_extensions"]
    tbs = _tlv(0x30, b"".join((
        _integer(1),  # v2
        asn1_crl.TbsCertList({"signature": algorithm})["signature"].dump(),
        issuer.certificate.subject.public_bytes(),
        asn1_x509.Time({"utc_time": now - timedelta(hours=1)}).dump(),
        asn1_x509.Time({"utc_time": next_update or now + 7 * DAY}).dump(),
        revoked_certificates,
        extensions.dump(),  # explicitly tagged [0] by asn1crypto
    )))
    key = issuer.private_key
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    signature_algorithm = asn1_crl.CertificateList({"signature_algorithm": algorithm})["signature_algorithm"].dump()
    return _tlv(0x30, tbs + signature_algorithm + _tlv(0x03, b"\x00" + signature))
