"""Steps 7-8: the signed content, read as IMDS writes it, and its validity window.

IMDS documentation, "Attested data": the content is a JSON object with ``nonce``, ``plan``,
``timeStamp.createdOn``/``expiresOn`` (format ``MM/DD/YY HH:MM:SS -0000``), ``vmId`` and, on newer API
versions, ``licenseType``, ``subscriptionId`` and ``sku``. Classic documents carry only ``vmId`` besides
nonce, plan and timeStamp; empty ``sku`` and ``plan`` fields are normal (custom images).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final

from attest_service.errors import MalformedDocument

#: Signed content larger than this is refused before JSON parsing; IMDS's is about 300 bytes.
MAX_CONTENT_BYTES: Final = 16 * 1024
#: Deepest nesting of JSON arrays accepted (IMDS signs none). Objects nest as deep as the content size and
#: the decoder's recursion limit allow; past that the decoder's RecursionError is a malformed document.
MAX_JSON_DEPTH: Final = 8

# [0-9], not \d: \d also matches other scripts' digits, which int() would accept.
_TIMESTAMP: Final = re.compile(r"([0-9]{2})/([0-9]{2})/([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) -0000")
#: Longest signed nonce accepted. IMDS takes nonces of up to 32 characters; the bound keeps nonce-store
#: keys small even for documents from a producer that allowed more.
MAX_SIGNED_NONCE_CHARS: Final = 64

JsonValue = str | Mapping[str, "JsonValue"] | tuple["JsonValue", ...]


class FrozenArray(tuple[JsonValue, ...]):
    """A JSON array of the signed content, read-only; equal to the ``list`` ``json.loads`` makes of it."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return tuple.__eq__(self, tuple(other))
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Claims(Mapping[str, JsonValue]):
    """The signed content as a read-only mapping, exactly as signed, plus the fields the verifier interprets.

    It compares equal to the ``dict`` that ``json.loads`` makes of the content (nested objects are read-only
    mappings, arrays :class:`FrozenArray`), and ``dict(claims)`` or :func:`thaw` gives a plain copy.
    """

    fields: Mapping[str, JsonValue]
    nonce: str
    vm_id: str
    created_on: datetime
    expires_on: datetime

    def __getitem__(self, key: str) -> JsonValue:
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"Claims({thaw(self.fields)!r})"

    def value_at(self, *path: str) -> str | None:
        """The string at ``path`` (``value_at("plan", "publisher")``), or None when absent or not a string."""
        value: JsonValue | None = self.fields
        for key in path:
            if not isinstance(value, Mapping):
                return None
            value = value.get(key)
        return value if isinstance(value, str) else None


def _no_duplicates(pairs: list[tuple[str, object]]) -> Mapping[str, JsonValue]:
    # The decoder calls this for every object, innermost first, so freezing here (rather than walking the
    # result again) makes the claims immutable in the same pass that refuses duplicate keys.
    # (Built in C by dict(); duplicates are looked for only when the sizes say there are some.)
    result: dict[str, JsonValue] = dict(pairs)  # type: ignore[arg-type] # values are frozen just below
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedDocument(f"signed content: duplicate key {key!r}")
            seen.add(key)
    for key, value in result.items():
        # Replacing the value of a key already present leaves the dict's size, so its iteration, intact.
        if type(value) is not str and type(value) is not MappingProxyType:
            result[key] = _freeze(value, 0)
    return MappingProxyType(result)


def _refuse_constant(token: str) -> object:
    raise MalformedDocument(f"signed content: {token} is not JSON")


# Built once (json.loads() with hooks would build a decoder per call).
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)


def _freeze(value: object, depth: int) -> JsonValue:
    if depth > MAX_JSON_DEPTH:
        raise MalformedDocument("signed content: nested too deeply")
    if isinstance(value, str):
        return value
    if isinstance(value, MappingProxyType):
        return value
    if isinstance(value, list):
        return FrozenArray(_freeze(item, depth + 1) for item in value)
    # IMDS encodes every primitive as a string; numbers, booleans and null mean a different producer.
    raise MalformedDocument(f"signed content: {type(value).__name__} value where IMDS writes strings")


def parse_timestamp(text: str, what: str) -> datetime:
    """Parse IMDS's ``MM/DD/YY HH:MM:SS -0000`` (always UTC); anything else is malformed."""
    if _TIMESTAMP.fullmatch(text) is None:
        raise MalformedDocument(f"{what}: {text[:40]!r} is not in IMDS's MM/DD/YY HH:MM:SS -0000 format")
    if text[9:11] == "24":
        # The constructor refuses hour 24; newer Pythons' fromisoformat reads 24:00:00 as the next midnight.
        raise MalformedDocument(f"{what}: {text!r} is not a real instant")
    try:
        # The same instant as datetime(2000 + YY, MM, DD, HH, MM, SS, tzinfo=UTC), refused for the same
        # fields out of range; the C parser of the ISO form costs half of six int() calls and the constructor.
        return datetime.fromisoformat(f"20{text[6:8]}-{text[0:2]}-{text[3:5]}T{text[9:17]}+00:00")
    except ValueError as exc:
        raise MalformedDocument(f"{what}: {text!r} is not a real instant") from exc


def _required_string(fields: Mapping[str, JsonValue], key: str, what: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise MalformedDocument(f"signed content: {what} is missing or not a string")
    return value


def _nonce(fields: Mapping[str, JsonValue]) -> str:
    nonce = _required_string(fields, "nonce", "nonce")
    if not 1 <= len(nonce) <= MAX_SIGNED_NONCE_CHARS:
        raise MalformedDocument(f"signed content: nonce must have 1 to {MAX_SIGNED_NONCE_CHARS} characters")
    return nonce


def parse_claims(content: bytes) -> Claims:
    """Parse the signed content; raise MalformedDocument for anything IMDS would not have produced."""
    if len(content) > MAX_CONTENT_BYTES:
        raise MalformedDocument(f"signed content larger than {MAX_CONTENT_BYTES} bytes")
    try:
        text = content.decode("utf-8")
        raw = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, MalformedDocument):
            raise
        raise MalformedDocument("signed content is not UTF-8 JSON") from exc
    if not isinstance(raw, MappingProxyType):
        raise MalformedDocument("signed content is not a JSON object")
    if "\\u" in text:
        # A \uD800-\uDFFF escape without its pair decodes to a lone surrogate: no text IMDS writes, and no string
        # that can be encoded again (the nonce store digests the vmId and the nonce as UTF-8), so it is refused here
        # rather than failing later. Content without escapes comes from valid UTF-8, which has no surrogates.
        try:
            json.dumps(thaw(raw), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedDocument("signed content holds an unpaired UTF-16 surrogate escape") from exc
    fields: Mapping[str, JsonValue] = raw
    stamp = fields.get("timeStamp")
    # Every object of the content is a MappingProxyType (_no_duplicates); the concrete check is the cheap one.
    if not isinstance(stamp, MappingProxyType):
        raise MalformedDocument("signed content: timeStamp is missing or not an object")
    created_on = parse_timestamp(_required_string(stamp, "createdOn", "timeStamp.createdOn"), "createdOn")
    expires_on = parse_timestamp(_required_string(stamp, "expiresOn", "timeStamp.expiresOn"), "expiresOn")
    if expires_on < created_on:
        raise MalformedDocument("signed content: expiresOn precedes createdOn")
    return Claims(
        fields=fields,
        nonce=_nonce(fields),
        vm_id=_required_string(fields, "vmId", "vmId"),
        created_on=created_on,
        expires_on=expires_on,
    )


def thaw(value: JsonValue) -> object:
    """Plain ``dict``/``list`` copy of frozen claims, for JSON serialisation."""
    if isinstance(value, str):
        # Strings first (every primitive claim is one): the Mapping check is an ABC check, many times slower.
        return value
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return {key: thaw(item) for key, item in value.items()}
