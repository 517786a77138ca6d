"""A strict DER reader for the few structures the verifier walks.

Why not ``asn1crypto.cms.ContentInfo.load``: asn1crypto decodes BER leniently (indefinite lengths,
non-minimal length octets) where X.690 section 10 DER is required, and its schema-driven parse of one
document costs about five RSA-2048 verifications, more than the rest of a verification put together.
The verifier reads six fixed structures, so it walks them with this reader, which enforces DER on every
header it passes (definite form, minimal length octets, minimal tag numbers) and never recurses on
input-controlled depth. Certificates are handed to cryptography, whose Rust parser enforces DER itself;
signed attributes go through ``asn1crypto.cms``; the test suite checks this reader against asn1crypto.
"""

from __future__ import annotations

import functools
from typing import Final, NamedTuple

from attest_service.errors import MalformedDocument

CLASS_UNIVERSAL: Final = 0
CLASS_CONTEXT: Final = 2

TAG_INTEGER: Final = 2
TAG_OCTET_STRING: Final = 4
TAG_NULL: Final = 5
TAG_OID: Final = 6
TAG_SEQUENCE: Final = 16
TAG_SET: Final = 17

#: Longest length field accepted, in octets: 4 octets address 4 GiB, far beyond any document.
MAX_LENGTH_OCTETS: Final = 4
#: Most elements one constructed element may hold: the structures read have at most 8 (certificates), so a
#: flood of tiny elements is refused after this many headers instead of walked to its end.
MAX_ELEMENTS: Final = 64
#: Largest tag number accepted; the structures read here use tags below 31.
MAX_TAG_NUMBER: Final = 0xFFFF


class Tlv(NamedTuple):
    """One decoded DER element: class, constructed flag, tag number, and its exact encoding.

    A NamedTuple rather than a frozen dataclass: a document walk creates about thirty of these, and
    tuple construction is four times cheaper; it is just as immutable.
    """

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
        return self[0] == cls and self[2] == tag and self[1] == constructed


# NamedTuple's generated __new__ is Python code; tuple.__new__ builds the same object in C.
_new_tlv: Final = functools.partial(tuple.__new__, Tlv)


def _parse_at(data: bytes, offset: int, what: str,  # noqa: PLR0912 - one branch per X.690 rule
              end: int | None = None) -> tuple[Tlv, int]:
    """Decode the element starting at ``offset`` and ending by ``end`` (default: the end of ``data``)."""
    end = len(data) if end is None else end
    if end - offset < 2:
        raise MalformedDocument(f"{what}: truncated")
    first = data[offset]
    tag = first & 0x1F
    pos = offset + 1
    if tag == 0x1F:
        # X.690 8.1.2.4: high tag numbers in base 128, without leading zero groups.
        tag = 0
        while True:
            if pos >= end:
                raise MalformedDocument(f"{what}: truncated tag")
            octet = data[pos]
            pos += 1
            if tag == 0 and octet == 0x80:
                raise MalformedDocument(f"{what}: non-minimal tag number")
            tag = (tag << 7) | (octet & 0x7F)
            if tag > MAX_TAG_NUMBER:
                raise MalformedDocument(f"{what}: tag number too large")
            if not octet & 0x80:
                break
        if tag < 0x1F:
            raise MalformedDocument(f"{what}: non-minimal tag number")
    if pos >= end:
        raise MalformedDocument(f"{what}: truncated length")
    length = data[pos]
    pos += 1
    if length == 0x80:
        raise MalformedDocument(f"{what}: indefinite length is not DER")
    if length & 0x80:
        count = length & 0x7F
        if count > MAX_LENGTH_OCTETS or pos + count > end:
            raise MalformedDocument(f"{what}: length field too long")
        if data[pos] == 0:
            raise MalformedDocument(f"{what}: non-minimal length encoding is not DER")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80:
            raise MalformedDocument(f"{what}: non-minimal length encoding is not DER")
        pos += count
    if pos + length > end:
        raise MalformedDocument(f"{what}: truncated contents")
    return _new_tlv((first >> 6, bool(first & 0x20), tag, data[offset:pos], data[pos:pos + length])), pos + length


#: One element located inside a buffer without copying it: its identifier, where its header starts, where its
#: contents start and where it ends. The identifier is the first identifier octet (class, constructed bit, tag
#: number) for tag numbers below 31, which are all the structures read here use; a high tag number is given
#: as ``HIGH_TAG`` so that it never equals an expected identifier.
Span = tuple[int, int, int, int]
#: Identifier of a span whose tag number is 31 or more (see :data:`Span`).
HIGH_TAG: Final = -1


def spans(data: bytes, start: int, stop: int, what: str,  # noqa: PLR0912 - one branch per X.690 rule
          limit: int = MAX_ELEMENTS + 1) -> list[Span]:
    """Decode the headers of the elements filling ``data[start:stop]``, each strictly, copying nothing.

    The same X.690 rules as :func:`children` (definite, minimal lengths, minimal tag numbers, no element
    running past ``stop``): the verifier's hot path walks a document with this, and reads out only the
    bytes it keeps. With ``limit``, only the first ``limit`` elements are decoded (those are exactly the
    first ones a full walk gives, or the error it raises among them); the rest is left unread.
    """
    items: list[Span] = []
    offset = start
    while offset < stop and len(items) < limit:
        if stop - offset < 2:
            raise MalformedDocument(f"{what}: truncated")
        first = data[offset]
        if first & 0x1F == 0x1F:
            # A high tag number (rare, never expected): the general decoder checks it and finds its end.
            element, after = _parse_at(data, offset, what, stop)
            items.append((HIGH_TAG, offset, offset + len(element.header), after))
            offset = after
            if len(items) > MAX_ELEMENTS:
                raise MalformedDocument(f"{what}: more than {MAX_ELEMENTS} elements")
            continue
        pos = offset + 1
        length = data[pos]
        pos += 1
        if length & 0x80:
            if length == 0x80:
                raise MalformedDocument(f"{what}: indefinite length is not DER")
            count = length & 0x7F
            if count > MAX_LENGTH_OCTETS or pos + count > stop:
                raise MalformedDocument(f"{what}: length field too long")
            if data[pos] == 0:
                raise MalformedDocument(f"{what}: non-minimal length encoding is not DER")
            # One and two length octets (every element of an Azure document) without building a slice.
            if count == 1:
                length = data[pos]
            elif count == 2:
                length = (data[pos] << 8) | data[pos + 1]
            else:
                length = int.from_bytes(data[pos:pos + count], "big")
            if length < 0x80:
                raise MalformedDocument(f"{what}: non-minimal length encoding is not DER")
            pos += count
        end = pos + length
        if end > stop:
            raise MalformedDocument(f"{what}: truncated contents")
        items.append((first, offset, pos, end))
        offset = end
        if len(items) > MAX_ELEMENTS:
            raise MalformedDocument(f"{what}: more than {MAX_ELEMENTS} elements")
    return items


def whole(data: bytes, what: str) -> Span:
    """The one element filling ``data`` (as :func:`read`), as a span; trailing bytes are refused by count."""
    element, end = _parse_at(data, 0, what)
    if end != len(data):
        raise MalformedDocument(f"{what}: {len(data) - end} bytes of trailing data")
    first = data[0]
    return (first if first & 0x1F != 0x1F else HIGH_TAG), 0, len(element.header), end


def identifier(cls: int, tag: int, *, constructed: bool) -> int:
    """The identifier octet of a low tag number (below 31), as :func:`spans` reports it."""
    return (cls << 6) | (0x20 if constructed else 0) | tag


def read(data: bytes, what: str) -> Tlv:
    """Decode exactly one DER element filling ``data``; raise MalformedDocument otherwise."""
    element, end = _parse_at(data, 0, what)
    if end != len(data):
        raise MalformedDocument(f"{what}: {len(data) - end} bytes of trailing data")
    return element


def children(parent: Tlv, what: str) -> list[Tlv]:
    """Decode the elements inside a constructed element, each strictly."""
    if not parent.constructed:
        raise MalformedDocument(f"{what}: expected a constructed element")
    items: list[Tlv] = []
    data = parent.contents
    offset = 0
    while offset < len(data):
        element, offset = _parse_at(data, offset, what)
        items.append(element)
    return items


def expect(element: Tlv, cls: int, tag: int, *, constructed: bool, what: str) -> Tlv:
    """Return ``element`` if it has this class, tag and form; raise MalformedDocument otherwise."""
    if not element.is_(cls, tag, constructed=constructed):
        raise MalformedDocument(f"{what}: unexpected element")
    return element


def oid(element: Tlv, what: str) -> str:
    """Decode an OBJECT IDENTIFIER to dotted form (X.690 8.19), refusing non-minimal sub-identifiers."""
    expect(element, CLASS_UNIVERSAL, TAG_OID, constructed=False, what=what)
    return oid_contents(element.contents, what)


def oid_contents(body: bytes, what: str) -> str:
    """Decode the contents octets of an OBJECT IDENTIFIER (see :func:`oid`)."""
    known = _KNOWN_OIDS.get(body)
    if known is not None:
        return known
    if not body or body[-1] & 0x80 or len(body) > 64:
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
    top = min(first // 40, 2)
    return ".".join(str(arc) for arc in [top, first - 40 * top, *arcs[1:]])


def encode_oid(dotted: str) -> bytes:
    """The contents octets of an OBJECT IDENTIFIER (X.690 8.19), for the lookup table below."""
    arcs = [int(part) for part in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


def integer(element: Tlv, what: str) -> int:
    """Decode an INTEGER (X.690 8.3), refusing empty and non-minimal encodings."""
    expect(element, CLASS_UNIVERSAL, TAG_INTEGER, constructed=False, what=what)
    return integer_contents(element.contents, what)


def integer_contents(body: bytes, what: str) -> int:
    """Decode the contents octets of an INTEGER (see :func:`integer`)."""
    if not body:
        raise MalformedDocument(f"{what}: empty integer")
    if len(body) > 1 and ((body[0] == 0 and not body[1] & 0x80) or (body[0] == 0xFF and body[1] & 0x80)):
        raise MalformedDocument(f"{what}: non-minimal integer")
    return int.from_bytes(body, "big", signed=True)


# The OIDs every Azure document carries, decoded once; others take the general path above.
_KNOWN_OIDS: Final[dict[bytes, str]] = {
    encode_oid(dotted): dotted
    for dotted in (
        "1.2.840.113549.1.7.1", "1.2.840.113549.1.7.2", "1.2.840.113549.1.1.1", "1.2.840.113549.1.1.11",
        "1.2.840.113549.1.1.12", "1.2.840.113549.1.1.13", "2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.2.2",
        "2.16.840.1.101.3.4.2.3", "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4",
    )
}
