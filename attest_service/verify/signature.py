"""Step 4: the signature, under the certificate the SignerInfo names (RFC 5652 5.4-5.6)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attest_service.errors import MalformedDocument, SignatureInvalid, UnsupportedDocument
from attest_service.verify.pkcs7 import OID_DATA, SignedData, parameters_absent_or_null

_SHA256: Final = "sha256"
_SHA384: Final = "sha384"
_SHA512: Final = "sha512"

#: Digest algorithm OIDs accepted in ``digestAlgorithms`` and SignerInfo.digestAlgorithm. Azure puts the
#: sha*WithRSAEncryption signature OIDs there instead of the hash OIDs; they are read as their hash.
DIGEST_ALGORITHMS: Final[dict[str, str]] = {
    "2.16.840.1.101.3.4.2.1": _SHA256,
    "2.16.840.1.101.3.4.2.2": _SHA384,
    "2.16.840.1.101.3.4.2.3": _SHA512,
    "1.2.840.113549.1.1.11": _SHA256,
    "1.2.840.113549.1.1.12": _SHA384,
    "1.2.840.113549.1.1.13": _SHA512,
}

#: Digests refused by name: collisions are practical for MD5 and SHA-1 (RFC 6151, SHAttered).
WEAK_DIGESTS: Final[dict[str, str]] = {
    "1.2.840.113549.2.5": "MD5",
    "1.3.14.3.2.26": "SHA-1",
    "1.2.840.113549.1.1.4": "MD5",
    "1.2.840.113549.1.1.5": "SHA-1",
    "1.2.840.10045.4.1": "SHA-1",
}

_RSA_ENCRYPTION: Final = "1.2.840.113549.1.1.1"
#: Signature algorithms: OID -> (key family, hash implied by the OID or None for "the digest algorithm's").
SIGNATURE_ALGORITHMS: Final[dict[str, tuple[str, str | None]]] = {
    _RSA_ENCRYPTION: ("rsa", None),
    "1.2.840.113549.1.1.11": ("rsa", _SHA256),
    "1.2.840.113549.1.1.12": ("rsa", _SHA384),
    "1.2.840.113549.1.1.13": ("rsa", _SHA512),
    "1.2.840.10045.4.3.2": ("ecdsa", _SHA256),
    "1.2.840.10045.4.3.3": ("ecdsa", _SHA384),
    "1.2.840.10045.4.3.4": ("ecdsa", _SHA512),
}

_HASHES: Final[dict[str, Callable[[], hashes.HashAlgorithm]]] = {
    _SHA256: hashes.SHA256,
    _SHA384: hashes.SHA384,
    _SHA512: hashes.SHA512,
}

#: Signer keys accepted, in bits of the RSA modulus (inclusive): what Azure's IMDS signers use (every real
#: document from 2019 to 2026 is signed with RSA-2048, e=65537), with room for 3072 and 4096.
RSA_MODULUS_BITS: Final = (2048, 4096)
#: The only RSA public exponent accepted: F4, which every CA/B Forum certificate uses.
RSA_PUBLIC_EXPONENT: Final = 65537
#: Curves accepted for ECDSA signers: the two of Microsoft's ECC TLS issuing CAs.
EC_CURVES: Final = frozenset({"secp256r1", "secp384r1"})

_ATTR_CONTENT_TYPE: Final = "content_type"
_ATTR_MESSAGE_DIGEST: Final = "message_digest"


def _digest_name(oid: str, what: str) -> str:
    if oid in WEAK_DIGESTS:
        raise UnsupportedDocument(f"{what}: {WEAK_DIGESTS[oid]} is refused")
    try:
        return DIGEST_ALGORITHMS[oid]
    except KeyError:
        raise UnsupportedDocument(f"{what}: unsupported digest algorithm {oid}") from None


def digest_of(signed: SignedData) -> str:
    """Resolve the SignerInfo's digest algorithm; it must also be declared in ``digestAlgorithms``."""
    name = _digest_name(signed.digest_algorithm.oid, "SignerInfo.digestAlgorithm")
    if not parameters_absent_or_null(signed.digest_algorithm):
        raise MalformedDocument("SignerInfo.digestAlgorithm: unexpected parameters")
    declared = {_digest_name(alg.oid, "digestAlgorithms") for alg in signed.digest_algorithms}
    # The same rule as for the SignerInfo's field: otherwise these unsigned bytes could be varied freely
    # and a verifier would accept many encodings of one document.
    if not all(parameters_absent_or_null(alg) for alg in signed.digest_algorithms):
        raise MalformedDocument("SignedData.digestAlgorithms: unexpected parameters")
    if name not in declared:
        raise MalformedDocument("SignerInfo.digestAlgorithm is not declared in SignedData.digestAlgorithms")
    return name


def _signed_attributes_message(signed: SignedData, digest: str) -> bytes:
    """Check signed attributes per RFC 5652 5.3/11 and return the bytes the signature covers."""
    assert signed.signed_attributes is not None  # noqa: S101 - the caller checked; narrows the type
    # RFC 5652 5.4: the signature covers the DER of the attributes as a SET OF, i.e. with the [0]
    # IMPLICIT tag replaced by the universal SET tag; the rest of the encoding is unchanged.
    message = b"\x31" + signed.signed_attributes[1:]
    try:
        attributes = cms.CMSAttributes.load(message, strict=True)
        seen: dict[str, list[object]] = {}
        for attribute in attributes:
            seen.setdefault(attribute["type"].native, []).append(attribute["values"].native)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # AttributeError: asn1crypto has no native form for some universal types (REAL) it still parses.
        raise MalformedDocument("signed attributes: not parseable as DER") from exc
    content_types = seen.get(_ATTR_CONTENT_TYPE, [])
    digests = seen.get(_ATTR_MESSAGE_DIGEST, [])
    # RFC 5652 11.1/11.2: each present exactly once, with exactly one value.
    if len(content_types) != 1 or len(digests) != 1 or len(content_types[0]) != 1 or len(digests[0]) != 1:  # type: ignore[arg-type]
        raise MalformedDocument("signed attributes: contentType and messageDigest must each appear once")
    if content_types[0][0] not in ("data", OID_DATA):  # type: ignore[index]
        raise MalformedDocument("signed attributes: contentType differs from eContentType")
    expected = hashlib.new(digest, signed.content).digest()
    claimed = digests[0][0]  # type: ignore[index]
    if not isinstance(claimed, bytes) or not hmac.compare_digest(claimed, expected):
        raise SignatureInvalid("signed attributes: messageDigest does not match the content")
    return message


#: A public key of a kind Azure signs with (see :func:`signer_key`).
SignerKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def signer_key(signer: x509.Certificate) -> SignerKey:
    """The signer's public key, when it is of a kind Azure signs with; raise UnsupportedDocument otherwise.

    The signature is checked (step 4) before the name and the chain (steps 5 and 6), so the key is still the
    document's own choice here: a large modulus or a large exponent costs many times a genuine RSA-2048
    verification (docs/DEPLOYMENT.md, "Figures behind the code"). Reading the key's size and exponent costs
    nothing; the RSA operation runs only for keys inside these bounds.
    """
    try:
        key = signer.public_key()
    except UnsupportedAlgorithm as exc:
        raise UnsupportedDocument("the signer's public key is of a type not supported (RSA or ECDSA only)") from exc
    except ValueError as exc:
        raise MalformedDocument("the signer's public key is not a valid key") from exc
    if isinstance(key, rsa.RSAPublicKey):
        low, high = RSA_MODULUS_BITS
        if not low <= key.key_size <= high:
            raise UnsupportedDocument(f"the signer's RSA key has {key.key_size} bits; {low} to {high} are supported")
        if key.public_numbers().e != RSA_PUBLIC_EXPONENT:
            raise UnsupportedDocument(f"the signer's RSA public exponent is not {RSA_PUBLIC_EXPONENT}")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            raise UnsupportedDocument(f"the signer's EC key is on {key.curve.name}; P-256 and P-384 are supported")
        return key
    raise UnsupportedDocument(f"the signer's public key is of an unsupported type ({type(key).__name__})")


def verify_signature(signed: SignedData, signer: x509.Certificate, *,
                     key_of: Callable[[x509.Certificate], SignerKey] = signer_key) -> str:
    """Verify the SignerInfo's signature with ``signer``'s key; return the digest name used.

    Raises UnsupportedDocument for algorithms or keys outside the supported set (:func:`signer_key`),
    SignatureInvalid when the signature does not verify, MalformedDocument for broken signed attributes.
    ``key_of`` gives the key and refuses unsupported ones as :func:`signer_key` does (the verifier passes a
    per-certificate cache of it); it is called at the same point, so the first error found is the same.
    """
    digest = digest_of(signed)
    family, implied = SIGNATURE_ALGORITHMS.get(signed.signature_algorithm.oid, ("", None))
    if not family:
        raise UnsupportedDocument(f"unsupported signature algorithm {signed.signature_algorithm.oid}")
    if family == "rsa" and not parameters_absent_or_null(signed.signature_algorithm):
        raise MalformedDocument("signatureAlgorithm: unexpected parameters")
    if implied is not None and implied != digest:
        raise MalformedDocument("signatureAlgorithm and digestAlgorithm name different hashes")
    # Before any expensive operation: refuse keys outside what Azure uses.
    key = key_of(signer)
    message = signed.content
    if signed.signed_attributes is not None:
        message = _signed_attributes_message(signed, digest)
    algorithm = _HASHES[digest]()
    try:
        if family == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signed.signature, message, padding.PKCS1v15(), algorithm)
        elif family == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signed.signature, message, ec.ECDSA(algorithm))
        else:
            raise SignatureInvalid("the signature algorithm does not fit the signer's key type")
    except InvalidSignature as exc:
        raise SignatureInvalid("the signature does not verify under the certificate the SignerInfo names") from exc
    return digest
