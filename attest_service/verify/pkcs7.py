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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from attest_service.errors import MalformedDocument, UnsupportedDocument
from attest_service.verify import der
from attest_service.verify.der import (
    CLASS_CONTEXT,
    CLASS_UNIVERSAL,
    TAG_INTEGER,
    TAG_NULL,
    TAG_OCTET_STRING,
    TAG_OID,
    TAG_SEQUENCE,
    TAG_SET,
    Span,
)

OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
OID_DATA: Final = "1.2.840.113549.1.7.1"

# The identifier octets of the elements read (der.spans reports elements by this octet).
_SEQUENCE: Final = der.identifier(CLASS_UNIVERSAL, TAG_SEQUENCE, constructed=True)
_SET: Final = der.identifier(CLASS_UNIVERSAL, TAG_SET, constructed=True)
_OID: Final = der.identifier(CLASS_UNIVERSAL, TAG_OID, constructed=False)
_INTEGER: Final = der.identifier(CLASS_UNIVERSAL, TAG_INTEGER, constructed=False)
_OCTET_STRING: Final = der.identifier(CLASS_UNIVERSAL, TAG_OCTET_STRING, constructed=False)
_OCTET_STRING_CONSTRUCTED: Final = der.identifier(CLASS_UNIVERSAL, TAG_OCTET_STRING, constructed=True)
_CONTEXT_0: Final = der.identifier(CLASS_CONTEXT, 0, constructed=True)
_CONTEXT_1: Final = der.identifier(CLASS_CONTEXT, 1, constructed=True)
_CONTEXT_0_PRIMITIVE: Final = der.identifier(CLASS_CONTEXT, 0, constructed=False)

_T = TypeVar("_T")

#: Tails (and layouts) of one length a :class:`SignedDataCache` keeps.
PER_LENGTH: Final = 4
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


def _algorithm(data: bytes, span: Span, what: str) -> AlgorithmIdentifier:
    identifier, header, start, stop = span
    known = _KNOWN_ALGORITHMS.get(data[header:stop])
    if known is not None:
        return known
    if identifier != _SEQUENCE:
        raise MalformedDocument(f"{what}: unexpected element")
    parts = der.spans(data, start, stop, what)
    if not 1 <= len(parts) <= 2:
        raise MalformedDocument(f"{what}: malformed AlgorithmIdentifier")
    parameters = data[parts[1][1]:parts[1][3]] if len(parts) == 2 else None
    return AlgorithmIdentifier(oid=_oid(data, parts[0], what), parameters=parameters)


def _oid(data: bytes, span: Span, what: str) -> str:
    if span[0] != _OID:
        raise MalformedDocument(f"{what}: unexpected element")
    return der.oid_contents(data[span[2]:span[3]], what)


def _integer(data: bytes, span: Span, what: str) -> int:
    if span[0] != _INTEGER:
        raise MalformedDocument(f"{what}: unexpected element")
    return der.integer_contents(data[span[2]:span[3]], what)


def _only(parts: list[Span], identifier: int, what: str) -> Span:
    if len(parts) != 1:
        raise MalformedDocument(f"{what}: expected exactly one element, found {len(parts)}")
    if parts[0][0] != identifier:
        raise MalformedDocument(f"{what}: unexpected element")
    return parts[0]


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


def _signer_identifier(data: bytes, span: Span) -> SignerIdentifier:
    what = "SignerInfo.sid"
    identifier, _, start, stop = span
    if identifier == _SEQUENCE:
        parts = der.spans(data, start, stop, what)
        if len(parts) != 2:
            raise MalformedDocument(f"{what}: malformed IssuerAndSerialNumber")
        if parts[0][0] != _SEQUENCE:
            raise MalformedDocument(f"{what}: unexpected element")
        return SignerIdentifier(issuer_der=data[parts[0][1]:parts[0][3]], serial=_integer(data, parts[1], what))
    if identifier == _CONTEXT_0_PRIMITIVE:
        if start == stop:
            raise MalformedDocument(f"{what}: empty subjectKeyIdentifier")
        return SignerIdentifier(subject_key_identifier=data[start:stop])
    raise MalformedDocument(f"{what}: neither IssuerAndSerialNumber nor SubjectKeyIdentifier")


def _encapsulated_content(data: bytes, span: Span) -> tuple[str, bytes]:
    what = "encapContentInfo"
    if span[0] != _SEQUENCE:
        raise MalformedDocument(f"{what}: unexpected element")
    parts = der.spans(data, span[2], span[3], what)
    if not parts or len(parts) > 2:
        raise MalformedDocument(f"{what}: malformed")
    content_type = _oid(data, parts[0], f"{what}.eContentType")
    if len(parts) == 1:
        raise UnsupportedDocument("detached content: the document does not carry what it signs")
    wrapper = parts[1]
    if wrapper[0] != _CONTEXT_0:
        raise MalformedDocument(f"{what}.eContent: unexpected element")
    inner = der.spans(data, wrapper[2], wrapper[3], f"{what}.eContent")
    if len(inner) != 1:
        raise MalformedDocument(f"{what}.eContent: expected one OCTET STRING")
    octets = inner[0]
    if octets[0] == _OCTET_STRING_CONSTRUCTED:
        # DER (X.690 10.2) forbids the constructed form that BER allows for OCTET STRING.
        raise MalformedDocument(f"{what}.eContent: constructed OCTET STRING is not DER")
    if octets[0] != _OCTET_STRING:
        raise MalformedDocument(f"{what}.eContent: unexpected element")
    return content_type, data[octets[2]:octets[3]]


def _signer_info(data: bytes, span: Span) -> tuple[SignerIdentifier, AlgorithmIdentifier, bytes | None,
                                                    AlgorithmIdentifier, Span]:
    what = "SignerInfo"
    if span[0] != _SEQUENCE:
        raise MalformedDocument(f"{what}: unexpected element")
    parts = der.spans(data, span[2], span[3], what)
    if len(parts) < 5:
        raise MalformedDocument(f"{what}: too few fields")
    version = _integer(data, parts[0], f"{what}.version")
    if version not in (1, 3):
        raise MalformedDocument(f"{what}: version {version} is not 1 or 3")
    signer = _signer_identifier(data, parts[1])
    # RFC 5652 5.3: version 1 goes with issuerAndSerialNumber, version 3 with subjectKeyIdentifier.
    if (version == 1) != (signer.issuer_der is not None):
        raise MalformedDocument(f"{what}: version {version} does not match its signer identifier")
    digest_algorithm = _algorithm(data, parts[2], f"{what}.digestAlgorithm")
    index = 3
    signed_attributes = None
    if parts[index][0] == _CONTEXT_0:
        signed_attributes = data[parts[index][1]:parts[index][3]]
        index += 1
    if len(parts) < index + 2:
        raise MalformedDocument(f"{what}: too few fields")
    signature_algorithm = _algorithm(data, parts[index], f"{what}.signatureAlgorithm")
    signature_span = parts[index + 1]
    if signature_span[0] != _OCTET_STRING:
        raise MalformedDocument(f"{what}.signature: unexpected element")
    index += 2
    if index < len(parts):
        if parts[index][0] != _CONTEXT_1:
            raise MalformedDocument(f"{what}.unsignedAttrs: unexpected element")
        index += 1
    if index != len(parts):
        raise MalformedDocument(f"{what}: unexpected trailing fields")
    return signer, digest_algorithm, signed_attributes, signature_algorithm, signature_span


def _signed_data_span(data: bytes) -> Span:
    """The SignedData element: ContentInfo, its contentType and its [0] EXPLICIT wrapper checked on the way."""
    top = _only([der.whole(data, "ContentInfo")], _SEQUENCE, "ContentInfo")
    parts = der.spans(data, top[2], top[3], "ContentInfo")
    if len(parts) != 2:
        raise MalformedDocument("ContentInfo: expected contentType and content")
    if _oid(data, parts[0], "ContentInfo.contentType") != OID_SIGNED_DATA:
        raise UnsupportedDocument("ContentInfo: not PKCS7 SignedData")
    if parts[1][0] != _CONTEXT_0:
        raise MalformedDocument("ContentInfo.content: unexpected element")
    return _only(der.spans(data, parts[1][2], parts[1][3], "ContentInfo.content"), _SEQUENCE, "SignedData")


def _head(data: bytes, fields: list[Span]) -> tuple[tuple[AlgorithmIdentifier, ...], str, bytes]:
    """SignedData's version, digestAlgorithms and encapContentInfo (its first three fields)."""
    version = _integer(data, fields[0], "SignedData.version")
    if not 1 <= version <= 5:
        raise MalformedDocument(f"SignedData: version {version} is out of range")
    if fields[1][0] != _SET:
        raise MalformedDocument("digestAlgorithms: unexpected element")
    digest_algorithms = tuple(_algorithm(data, item, "digestAlgorithms")
                              for item in der.spans(data, fields[1][2], fields[1][3], "digestAlgorithms"))
    content_type, content = _encapsulated_content(data, fields[2])
    return digest_algorithms, content_type, content


@dataclass(frozen=True, slots=True)
class _Tail:
    """What SignedData's fields after encapContentInfo (certificates, crls, signerInfos) parsed to.

    ``before`` and ``after`` are the tail's exact bytes before and after the contents of the signature
    OCTET STRING, ``signature_length`` the length of those contents. The parse of a tail reads the
    signature's contents only to copy them out, so any tail with the same bytes around a signature of
    the same length parses to the same fields, with that signature.
    """

    before: bytes
    signature_length: int
    after: bytes
    #: ``len(before) + signature_length + len(after)``.
    length: int
    certificates: tuple[bytes, ...]
    signer: SignerIdentifier
    digest_algorithm: AlgorithmIdentifier
    signed_attributes: bytes | None
    signature_algorithm: AlgorithmIdentifier


def _parse(data: bytes, signed_data: Span | None = None) -> tuple[SignedData, _Tail]:
    """The general walk: every header of the structures read, strictly, in document order.

    ``signed_data`` is what :func:`_signed_data_span` gives for ``data``, when the caller has it already.
    """
    if signed_data is None:
        signed_data = _signed_data_span(data)
    fields = der.spans(data, signed_data[2], signed_data[3], "SignedData")
    if len(fields) < 4:
        raise MalformedDocument("SignedData: too few fields")
    digest_algorithms, content_type, content = _head(data, fields)
    index = 3
    certificates: tuple[bytes, ...] = ()
    if fields[index][0] == _CONTEXT_0:
        items = der.spans(data, fields[index][2], fields[index][3], "certificates")
        if len(items) > MAX_CERTIFICATES:
            raise MalformedDocument(f"certificates: more than {MAX_CERTIFICATES}")
        # Only X.509 certificates (plain SEQUENCEs) can name the signer; other CertificateChoices are
        # carried along but never considered.
        certificates = tuple(data[item[1]:item[3]] for item in items if item[0] == _SEQUENCE)
        index += 1
    if index < len(fields) and fields[index][0] == _CONTEXT_1:
        index += 1  # CRLs are not used: revocation is out of scope for IMDS documents.
    if index != len(fields) - 1:
        raise MalformedDocument("SignedData: unexpected fields")
    if fields[index][0] != _SET:
        raise MalformedDocument("signerInfos: unexpected element")
    signer_infos = der.spans(data, fields[index][2], fields[index][3], "signerInfos")
    if len(signer_infos) != 1:
        raise UnsupportedDocument(f"expected exactly one SignerInfo, found {len(signer_infos)}")
    signer, digest_algorithm, signed_attributes, signature_algorithm, signature = _signer_info(data, signer_infos[0])
    tail = _Tail(data[fields[2][3]:signature[2]], signature[3] - signature[2], data[signature[3]:signed_data[3]],
                 signed_data[3] - fields[2][3], certificates, signer, digest_algorithm, signed_attributes,
                 signature_algorithm)
    return _signed(digest_algorithms, content_type, content, tail, data[signature[2]:signature[3]]), tail


def _signed(digest_algorithms: tuple[AlgorithmIdentifier, ...], content_type: str, content: bytes, tail: _Tail,
            signature: bytes) -> SignedData:
    return SignedData(
        digest_algorithms=digest_algorithms,
        content_type=content_type,
        content=content,
        certificates=tail.certificates,
        signer=tail.signer,
        digest_algorithm=tail.digest_algorithm,
        signed_attributes=tail.signed_attributes,
        signature_algorithm=tail.signature_algorithm,
        signature=signature,
    )


def parse_signed_data(data: bytes) -> SignedData:
    """Parse a DER ContentInfo holding SignedData; raise MalformedDocument or UnsupportedDocument.

    The walk locates elements by offset (:func:`~attest_service.verify.der.spans`) and copies out only the
    fields it returns: it runs once per request, and the document is most of the request.
    """
    return _parse(data)[0]


@dataclass(frozen=True, slots=True)
class _Layout:
    """A whole document but for its content and signature.

    The bytes before the content, what they parse to, and the tail after the content.
    """

    prefix: bytes
    digest_algorithms: tuple[AlgorithmIdentifier, ...]
    content_type: str
    tail: _Tail


class SignedDataCache:
    """Bounded memory of the SignedData layouts one verifier parsed, for :func:`parse_signed_data_cached`.

    Documents from one signer differ in their content and in the signature value; what follows the
    content (the signer's certificate and the SignerInfo, about 2.5 KiB of an Azure document) is the same
    bytes each time: a *tail*, remembered by its length. What precedes the content (about 60 bytes of
    headers, the digest algorithms and the content type) is the same too when the content has the same
    length, as it has for the documents of one image with nonces of one length: with the tail, a
    *layout*, remembered by the document's length. At most ``entries`` tails and ``entries`` lengths of
    layouts are kept (a few MiB at most, whatever the input). Thread-safe.
    """

    def __init__(self, entries: int) -> None:
        self._entries = entries
        self._tails: dict[int, tuple[_Tail, ...]] = {}
        self._layouts: dict[int, tuple[_Layout, ...]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many tails and layouts are remembered."""
        return sum(map(len, self._tails.values())) + sum(map(len, self._layouts.values()))

    def tail(self, data: bytes, start: int) -> _Tail | None:
        """The tail remembered for ``data[start:]``, when its bytes around the signature are the same."""
        for tail in self._tails.get(len(data) - start, ()):
            if data.startswith(tail.before, start) and data.endswith(tail.after):
                return tail
        return None

    def layout(self, data: bytes) -> _Layout | None:
        """The layout remembered for ``data``, when its bytes but the content's and the signature's are the same."""
        for layout in self._layouts.get(len(data), ()):
            tail = layout.tail
            if (data.startswith(layout.prefix) and data.startswith(tail.before, len(data) - tail.length)
                    and data.endswith(tail.after)):
                return layout
        return None

    def shared(self, data: bytes) -> tuple[int, int] | None:
        """Where the bytes all documents of ``data``'s layout share lie; None when the layout is not remembered.

        That is the tail before the signature, which holds the certificates.
        """
        layout = self.layout(data)
        if layout is None:
            return None
        start = len(data) - layout.tail.length
        return start, start + len(layout.tail.before)

    def remember(self, data: bytes, signed: SignedData, tail: _Tail, *, new_tail: bool) -> None:
        """Keep the layout of ``data`` (which parsed to ``signed``), and its tail when ``new_tail``.

        The latest few of each length are kept (the leaf certificates of one CA often have one length);
        beyond the bound, each table starts afresh.
        """
        layout = _Layout(data[:len(data) - tail.length - len(signed.content)], signed.digest_algorithms,
                         signed.content_type, tail)
        with self._lock:
            if new_tail:
                # Tails are the large entries (about 2.5 KiB each): at most ``entries`` of them in all.
                _keep(self._tails, tail.length, tail, max(1, self._entries // PER_LENGTH))
            _keep(self._layouts, len(data), layout, self._entries)


def _keep(table: dict[int, tuple[_T, ...]], length: int, item: _T, entries: int) -> None:
    if len(table) >= entries:
        table.clear()
    table[length] = (item, *table.get(length, ())[:PER_LENGTH - 1])


def parse_signed_data_cached(data: bytes, cache: SignedDataCache,
                             deferred: list[Callable[[], None]] | None = None) -> SignedData:
    """:func:`parse_signed_data`, taking what it can from ``cache``; exactly the same result or error.

    A document of a layout ``cache`` does not hold yet is remembered at once, or, with ``deferred``, by the
    function appended to it: the verifier calls it once the document verified up to its chain, so that only
    what Azure signed takes room in the cache (a document need only parse to be remembered otherwise).

    The general walk reads the contents of the content's and the signature's OCTET STRINGs only to copy
    them out (every other byte it reads is a header, or the contents of an OID, INTEGER or
    AlgorithmIdentifier). So a document equal to one it parsed in every other byte, each at the same
    place, parses to the same fields but for its own content and signature: a remembered layout gives them.

    Otherwise the walk up to the end of encapContentInfo runs as always (the same code in the same order)
    and SignedData's fields from there on are a remembered tail's, when the bytes from there to the end
    of SignedData (which is the end of the document) are that tail's but for the signature: SignedData
    then holds the same number of fields, and the general walk would read them to the same values. A miss
    goes on with the general walk, from the SignedData element already found.
    """
    layout = cache.layout(data)
    if layout is not None:
        tail = layout.tail
        content_end = len(data) - tail.length
        signature_end = len(data) - len(tail.after)
        return _signed(layout.digest_algorithms, layout.content_type, data[len(layout.prefix):content_end], tail,
                       data[signature_end - tail.signature_length:signature_end])
    # Each step below raises exactly the error the general walk would: the general walk starts with the
    # same call; it walks SignedData's fields in order, so an error among the first three is its first
    # error too; and with a remembered tail it has the same fields and reads the first three with _head.
    signed_data = _signed_data_span(data)
    head = der.spans(data, signed_data[2], signed_data[3], "SignedData", limit=3)
    found = cache.tail(data, head[2][3]) if len(head) == 3 and signed_data[3] == len(data) else None
    if found is not None:
        digest_algorithms, content_type, content = _head(data, head)
        signature_end = len(data) - len(found.after)
        signed = _signed(digest_algorithms, content_type, content, found,
                         data[signature_end - found.signature_length:signature_end])
        _remember(cache, deferred, data, signed, found, new_tail=False)
        return signed
    signed, tail = _parse(data, signed_data)
    _remember(cache, deferred, data, signed, tail, new_tail=True)
    return signed


def _remember(cache: SignedDataCache, deferred: list[Callable[[], None]] | None, data: bytes, signed: SignedData,
              tail: _Tail, *, new_tail: bool) -> None:
    if deferred is None:
        cache.remember(data, signed, tail, new_tail=new_tail)
    else:
        deferred.append(lambda: cache.remember(data, signed, tail, new_tail=new_tail))


def parameters_absent_or_null(algorithm: AlgorithmIdentifier) -> bool:
    """True when an AlgorithmIdentifier's parameters are absent or an ASN.1 NULL (RFC 4055 2.1)."""
    return algorithm.parameters is None or algorithm.parameters == bytes((TAG_NULL, 0))

