"""RFC 5652 SignedData, read strictly: the fields the verifier needs, and nothing taken on trust.

Structures read (RFC 5652 sections 3, 5.1, 5.2, 5.3)::

    ContentInfo ::= SEQUENCE { contentType id-signedData, content [0] EXPLICIT SignedData }
    SignedData ::= SEQUENCE { version, digestAlgorithms SET, encapContentInfo, certificates [0] IMPLICIT
                              OPTIONAL, crls [1] IMPLICIT OPTIONAL, signerInfos SET }
    EncapsulatedContentInfo ::= SEQUENCE { eContentType, eContent [0] EXPLICIT OCTET STRING OPTIONAL }
    SignerInfo ::= SEQUENCE { version, sid, digestAlgorithm, signedAttrs [0] IMPLICIT OPTIONAL,
                              signatureAlgorithm, signature OCTET STRING, unsignedAttrs [1] IMPLICIT OPTIONAL }
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from attest_service.errors import MalformedDocument, UnsupportedDocument
from attest_service.verify import der
from attest_service.verify.der import (
    CLASS_CONTEXT,
    CLASS_UNIVERSAL,
    TAG_NULL,
    TAG_OCTET_STRING,
    TAG_SEQUENCE,
    TAG_SET,
    Tlv,
)

OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
OID_DATA: Final = "1.2.840.113549.1.7.1"

#: Certificates a document may carry. Azure's carry one (the signer); a few more are tolerated, a flood is not.
MAX_CERTIFICATES: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class AlgorithmIdentifier:
    """An AlgorithmIdentifier: the OID, and the DER of its parameters (None when absent)."""

    oid: str
    parameters: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignerIdentifier:
    """The SignerInfo's ``sid``: issuer Name DER and serial, or a subject key identifier."""

    issuer_der: bytes | None = None
    serial: int | None = None
    subject_key_identifier: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedData:
    """The parts of one SignedData the verifier uses, each exactly as encoded."""

    digest_algorithms: tuple[AlgorithmIdentifier, ...]
    content_type: str
    content: bytes
    certificates: tuple[bytes, ...]
    signer: SignerIdentifier
    digest_algorithm: AlgorithmIdentifier
    signed_attributes: bytes | None
    signature_algorithm: AlgorithmIdentifier
    signature: bytes


def _algorithm(element: Tlv, what: str) -> AlgorithmIdentifier:
    known = _KNOWN_ALGORITHMS.get(element.header + element.contents)
    if known is not None:
        return known
    der.expect(element, CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what=what)
    parts = der.children(element, what)
    if not 1 <= len(parts) <= 2:
        raise MalformedDocument(f"{what}: malformed AlgorithmIdentifier")
    parameters = parts[1].encoded if len(parts) == 2 else None
    return AlgorithmIdentifier(oid=der.oid(parts[0], what), parameters=parameters)


def _known_algorithm(dotted: str, *, null_parameters: bool) -> tuple[bytes, AlgorithmIdentifier]:
    body = der.encode_oid(dotted)
    parameters = bytes((TAG_NULL, 0)) if null_parameters else None
    inner = bytes((6, len(body))) + body + (parameters or b"")
    return bytes((0x30, len(inner))) + inner, AlgorithmIdentifier(oid=dotted, parameters=parameters)


# The AlgorithmIdentifiers Azure documents use, matched by their exact DER so that the common case
# skips two element decodes each; anything else takes the general path.
_KNOWN_ALGORITHMS: Final[dict[bytes, AlgorithmIdentifier]] = dict(
    _known_algorithm(dotted, null_parameters=null)
    for dotted in ("1.2.840.113549.1.1.1", "1.2.840.113549.1.1.11", "2.16.840.1.101.3.4.2.1")
    for null in (True, False)
)


def _signer_identifier(element: Tlv) -> SignerIdentifier:
    what = "SignerInfo.sid"
    if element.is_(CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True):
        parts = der.children(element, what)
        if len(parts) != 2:
            raise MalformedDocument(f"{what}: malformed IssuerAndSerialNumber")
        issuer = der.expect(parts[0], CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what=what)
        return SignerIdentifier(issuer_der=issuer.encoded, serial=der.integer(parts[1], what))
    if element.is_(CLASS_CONTEXT, 0, constructed=False):
        if not element.contents:
            raise MalformedDocument(f"{what}: empty subjectKeyIdentifier")
        return SignerIdentifier(subject_key_identifier=element.contents)
    raise MalformedDocument(f"{what}: neither IssuerAndSerialNumber nor SubjectKeyIdentifier")


def _encapsulated_content(element: Tlv) -> tuple[str, bytes]:
    what = "encapContentInfo"
    der.expect(element, CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what=what)
    parts = der.children(element, what)
    if not parts or len(parts) > 2:
        raise MalformedDocument(f"{what}: malformed")
    content_type = der.oid(parts[0], f"{what}.eContentType")
    if len(parts) == 1:
        raise UnsupportedDocument("detached content: the document does not carry what it signs")
    wrapper = der.expect(parts[1], CLASS_CONTEXT, 0, constructed=True, what=f"{what}.eContent")
    inner = der.children(wrapper, f"{what}.eContent")
    if len(inner) != 1:
        raise MalformedDocument(f"{what}.eContent: expected one OCTET STRING")
    octets = inner[0]
    if octets.is_(CLASS_UNIVERSAL, TAG_OCTET_STRING, constructed=True):
        # DER (X.690 10.2) forbids the constructed form that BER allows for OCTET STRING.
        raise MalformedDocument(f"{what}.eContent: constructed OCTET STRING is not DER")
    der.expect(octets, CLASS_UNIVERSAL, TAG_OCTET_STRING, constructed=False, what=f"{what}.eContent")
    return content_type, octets.contents


def _signer_info(element: Tlv) -> tuple[SignerIdentifier, AlgorithmIdentifier, bytes | None,
                                        AlgorithmIdentifier, bytes]:
    what = "SignerInfo"
    der.expect(element, CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what=what)
    parts = der.children(element, what)
    if len(parts) < 5:
        raise MalformedDocument(f"{what}: too few fields")
    version = der.integer(parts[0], f"{what}.version")
    if version not in (1, 3):
        raise MalformedDocument(f"{what}: version {version} is not 1 or 3")
    signer = _signer_identifier(parts[1])
    # RFC 5652 5.3: version 1 goes with issuerAndSerialNumber, version 3 with subjectKeyIdentifier.
    if (version == 1) != (signer.issuer_der is not None):
        raise MalformedDocument(f"{what}: version {version} does not match its signer identifier")
    digest_algorithm = _algorithm(parts[2], f"{what}.digestAlgorithm")
    index = 3
    signed_attributes = None
    if parts[index].is_(CLASS_CONTEXT, 0, constructed=True):
        signed_attributes = parts[index].encoded
        index += 1
    if len(parts) < index + 2:
        raise MalformedDocument(f"{what}: too few fields")
    signature_algorithm = _algorithm(parts[index], f"{what}.signatureAlgorithm")
    signature = der.expect(parts[index + 1], CLASS_UNIVERSAL, TAG_OCTET_STRING, constructed=False,
                           what=f"{what}.signature").contents
    index += 2
    if index < len(parts):
        der.expect(parts[index], CLASS_CONTEXT, 1, constructed=True, what=f"{what}.unsignedAttrs")
        index += 1
    if index != len(parts):
        raise MalformedDocument(f"{what}: unexpected trailing fields")
    return signer, digest_algorithm, signed_attributes, signature_algorithm, signature


def parse_signed_data(data: bytes) -> SignedData:
    """Parse a DER ContentInfo holding SignedData; raise MalformedDocument or UnsupportedDocument."""
    content_info = der.read(data, "ContentInfo")
    der.expect(content_info, CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what="ContentInfo")
    parts = der.children(content_info, "ContentInfo")
    if len(parts) != 2:
        raise MalformedDocument("ContentInfo: expected contentType and content")
    if der.oid(parts[0], "ContentInfo.contentType") != OID_SIGNED_DATA:
        raise UnsupportedDocument("ContentInfo: not PKCS7 SignedData")
    wrapper = der.expect(parts[1], CLASS_CONTEXT, 0, constructed=True, what="ContentInfo.content")
    inner = der.children(wrapper, "ContentInfo.content")
    if len(inner) != 1:
        raise MalformedDocument("ContentInfo.content: expected one SignedData")
    signed_data = der.expect(inner[0], CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True, what="SignedData")
    fields = der.children(signed_data, "SignedData")
    if len(fields) < 4:
        raise MalformedDocument("SignedData: too few fields")
    version = der.integer(fields[0], "SignedData.version")
    if not 1 <= version <= 5:
        raise MalformedDocument(f"SignedData: version {version} is out of range")
    digest_set = der.expect(fields[1], CLASS_UNIVERSAL, TAG_SET, constructed=True, what="digestAlgorithms")
    digest_algorithms = tuple(_algorithm(item, "digestAlgorithms")
                              for item in der.children(digest_set, "digestAlgorithms"))
    content_type, content = _encapsulated_content(fields[2])
    index = 3
    certificates: tuple[bytes, ...] = ()
    if fields[index].is_(CLASS_CONTEXT, 0, constructed=True):
        items = der.children(fields[index], "certificates")
        if len(items) > MAX_CERTIFICATES:
            raise MalformedDocument(f"certificates: more than {MAX_CERTIFICATES}")
        # Only X.509 certificates (plain SEQUENCEs) can name the signer; other CertificateChoices are
        # carried along but never considered.
        certificates = tuple(item.encoded for item in items
                             if item.is_(CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True))
        index += 1
    if index < len(fields) and fields[index].is_(CLASS_CONTEXT, 1, constructed=True):
        index += 1  # CRLs are not used: revocation is out of scope for IMDS documents.
    if index != len(fields) - 1:
        raise MalformedDocument("SignedData: unexpected fields")
    signer_set = der.expect(fields[index], CLASS_UNIVERSAL, TAG_SET, constructed=True, what="signerInfos")
    signer_infos = der.children(signer_set, "signerInfos")
    if len(signer_infos) != 1:
        raise UnsupportedDocument(f"expected exactly one SignerInfo, found {len(signer_infos)}")
    signer, digest_algorithm, signed_attributes, signature_algorithm, signature = _signer_info(signer_infos[0])
    return SignedData(
        digest_algorithms=digest_algorithms,
        content_type=content_type,
        content=content,
        certificates=certificates,
        signer=signer,
        digest_algorithm=digest_algorithm,
        signed_attributes=signed_attributes,
        signature_algorithm=signature_algorithm,
        signature=signature,
    )


def parameters_absent_or_null(algorithm: AlgorithmIdentifier) -> bool:
    """True when an AlgorithmIdentifier's parameters are absent or an ASN.1 NULL (RFC 4055 2.1)."""
    return algorithm.parameters is None or algorithm.parameters == bytes((TAG_NULL, 0))

