"""A strict DER reader over asn1crypto's TLV parser.

Why not ``asn1crypto.cms.ContentInfo.load`` alone: asn1crypto decodes BER leniently (indefinite lengths,
non-minimal length octets) where RFC 5652 SignedData for this purpose is DER, and its schema-driven
parse of a full document costs roughly five RSA-2048 verifications. The verifier reads six fixed
structures, so it walks them with asn1crypto's own TLV decoder and enforces DER on every header it
passes (X.690 section 10.1: definite form, minimal length octets). Certificates are handed to
cryptography, whose Rust parser enforces DER itself; signed attributes go through ``asn1crypto.cms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from asn1crypto import parser

from attest_service.errors import MalformedDocument

CLASS_UNIVERSAL: Final = 0
CLASS_CONTEXT: Final = 2

TAG_INTEGER: Final = 2
TAG_OCTET_STRING: Final = 4
TAG_NULL: Final = 5
TAG_OID: Final = 6
TAG_SEQUENCE: Final = 16
TAG_SET: Final = 17


@dataclass(frozen=True, slots=True)
class Tlv:
    """One decoded DER element: class, constructed flag, tag number, and its exact encoding."""

    cls: int
    constructed: bool
    tag: int
    header: bytes
    contents: bytes

    @property
    def encoded(self) -> bytes:
        """The element's full DER encoding (header and contents)."""
        return self.header + self.contents

    def is_(self, cls: int, tag: int, *, constructed: bool) -> bool:
        """True when the element has exactly this class, tag and form."""
        return self.cls == cls and self.tag == tag and self.constructed == constructed


def _check_header(header: bytes, length: int, what: str) -> None:
    # X.690 10.1: DER uses the definite form with the minimum number of length octets.
    first_length_octet_index = 1
    if header[0] & 0x1F == 0x1F:
        # High tag numbers: skip the tag's continuation octets.
        first_length_octet_index = 1
        while header[first_length_octet_index] & 0x80:
            first_length_octet_index += 1
        first_length_octet_index += 1
    length_octet = header[first_length_octet_index]
    if length_octet == 0x80:
        raise MalformedDocument(f"{what}: indefinite length is not DER")
    if length_octet & 0x80:
        count = length_octet & 0x7F
        if length < 0x80 or header[first_length_octet_index + 1] == 0 or count > 4:
            raise MalformedDocument(f"{what}: non-minimal length encoding is not DER")


def read(data: bytes, what: str) -> Tlv:
    """Decode exactly one DER element filling ``data``; raise MalformedDocument otherwise."""
    try:
        cls, method, tag, header, contents, trailer = parser.parse(data, strict=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise MalformedDocument(f"{what}: not DER ({exc})") from exc
    if trailer:
        raise MalformedDocument(f"{what}: indefinite length is not DER")
    _check_header(header, len(contents), what)
    return Tlv(cls, bool(method), tag, header, contents)


def children(parent: Tlv, what: str) -> list[Tlv]:
    """Decode the elements inside a constructed element, each strictly."""
    if not parent.constructed:
        raise MalformedDocument(f"{what}: expected a constructed element")
    items: list[Tlv] = []
    rest = parent.contents
    while rest:
        try:
            cls, method, tag, header, contents, trailer = parser.parse(rest)
        except (ValueError, TypeError, OverflowError) as exc:
            raise MalformedDocument(f"{what}: not DER ({exc})") from exc
        if trailer:
            raise MalformedDocument(f"{what}: indefinite length is not DER")
        _check_header(header, len(contents), what)
        items.append(Tlv(cls, bool(method), tag, header, contents))
        rest = rest[len(header) + len(contents):]
    return items


def expect(element: Tlv, cls: int, tag: int, *, constructed: bool, what: str) -> Tlv:
    """Return ``element`` if it has this class, tag and form; raise MalformedDocument otherwise."""
    if not element.is_(cls, tag, constructed=constructed):
        raise MalformedDocument(f"{what}: unexpected element")
    return element


def oid(element: Tlv, what: str) -> str:
    """Decode an OBJECT IDENTIFIER to dotted form (X.690 8.19), refusing non-minimal sub-identifiers."""
    expect(element, CLASS_UNIVERSAL, TAG_OID, constructed=False, what=what)
    body = element.contents
    if not body or body[-1] & 0x80:
        raise MalformedDocument(f"{what}: malformed object identifier")
    arcs: list[int] = []
    value = 0
    starting = True
    for octet in body:
        if starting and octet == 0x80:
            raise MalformedDocument(f"{what}: non-minimal object identifier")
        value = (value << 7) | (octet & 0x7F)
        starting = not octet & 0x80
        if starting:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])


def integer(element: Tlv, what: str) -> int:
    """Decode an INTEGER (X.690 8.3), refusing empty and non-minimal encodings."""
    expect(element, CLASS_UNIVERSAL, TAG_INTEGER, constructed=False, what=what)
    body = element.contents
    if not body:
        raise MalformedDocument(f"{what}: empty integer")
    if len(body) > 1 and ((body[0] == 0 and not body[1] & 0x80) or (body[0] == 0xFF and body[1] & 0x80)):
        raise MalformedDocument(f"{what}: non-minimal integer")
    return int.from_bytes(body, "big", signed=True)
