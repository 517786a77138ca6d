"""The verifier's fast paths give exactly the answer (result, or error type and message) of its general paths.

Each fast path is compared against the general code it short-cuts, on valid input, on every kind of input
that sits close to the fast path's pattern, and on arbitrary input (Hypothesis).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attest_service.errors import AttestError, MalformedDocument
from attest_service.library import Verifier
from attest_service.trust import load_trust
from attest_service.verify import VerificationPolicy, claims, der, document
from attest_service.verify.document import _decode_document
from attest_service.verify.pkcs7 import SignedDataCache, parse_signed_data, parse_signed_data_cached

from .test_properties import FIXTURES, PROPERTY_SETTINGS, Fixture, mutants

TESTCASES = Path(__file__).resolve().parents[1] / "assets" / "testcases"


def _outcome(function: object, *args: object) -> tuple[str, object]:
    try:
        return "ok", function(*args)  # type: ignore[operator]
    except AttestError as exc:
        return type(exc).__name__, str(exc)


def _general_document(data: bytes | str) -> tuple[str, object]:
    """_decode_document as it was before the exact-response path: strip, strict JSON, _decode_response."""
    def general() -> bytes:
        text = data
        if isinstance(text, bytes):
            if len(text) > document.MAX_SIGNATURE_CHARS * 2:
                raise document.MalformedDocument("document: too large")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise document.MalformedDocument("document: not UTF-8 text") from exc
        text = text.strip()
        if text.startswith("{"):
            return document._decode_json(text)
        return document._decode_signature(text)
    return _outcome(general)


def _assert_same(data: str) -> None:
    expected = _general_document(data)
    assert _outcome(_decode_document, data) == expected
    assert _outcome(_decode_document, data.encode("utf-8", "surrogatepass")) == _general_document(
        data.encode("utf-8", "surrogatepass"))
    assert _outcome(document.decode, data) == expected


#: Characters that mean something to JSON, to base64 or to str.strip(), to put inside the signature.
_AWKWARD = ['"', "\\", "\\/", "\\u0041", "\\n", " ", "\t", "\n", "\r", "\x00", "\x1f", "\x7f", "=", "==", "===",
            "-", "_", "é", "\u2028", "\ufeff", "A", "AA", "AAA", "}", "{", ",", ":", '","x":"']

_ENCODED = [base64.b64encode(fixture.der).decode("ascii") for fixture in FIXTURES[:4]]


@st.composite
def _signatures(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from([*_ENCODED, "", "AAAA", "AA==", "A===", "QUJD"]))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(base)))
        if draw(st.booleans()):
            base = base[:at] + draw(st.sampled_from(_AWKWARD)) + base[at:]
        else:
            base = base[:at] + base[at + draw(st.integers(1, 4)):]
    return base


@st.composite
def _responses(draw: st.DrawFn) -> str:
    signature = draw(_signatures())
    form = draw(st.sampled_from(["compact", "spaced", "dumps", "other"]))
    if form == "compact":
        text = '{"encoding":"pkcs7","signature":"' + signature + '"}'
    elif form == "spaced":
        text = '{"encoding": "pkcs7", "signature": "' + signature + '"}'
    elif form == "dumps":
        text = json.dumps({"encoding": "pkcs7", "signature": signature})
    else:
        text = '{"encoding":"pkcs7","signature":"' + signature + draw(st.sampled_from(
            ['"}', '" }', '"}}', '","signature":"AAAA"}', '","encoding":"pkcs7"}', '"', '}', '"}\n', '"}x']))
    return draw(st.sampled_from(["", " ", "\n", "\ufeff"])) + text + draw(st.sampled_from(["", "\n", " \t"]))


def test_each_fixture_in_either_exact_form_decodes_as_by_the_general_path() -> None:
    for encoded in _ENCODED:
        for text in ('{"encoding":"pkcs7","signature":"' + encoded + '"}',
                     json.dumps({"encoding": "pkcs7", "signature": encoded})):
            assert document._exact_response(text) is not None
            _assert_same(text)
            _assert_same(text + "\n")


def test_text_just_off_the_exact_forms_is_left_to_the_general_path() -> None:
    encoded = _ENCODED[0]
    for signature in ["", " " + encoded, encoded + " ", encoded + "\n", encoded[:-1], encoded + "A", encoded + "==A",
                      encoded[:100] + "\\/" + encoded[100:], encoded[:100] + '"' + encoded[100:],
                      "A" * (document.MAX_SIGNATURE_CHARS + 4)]:
        text = '{"encoding":"pkcs7","signature":"' + signature + '"}'
        assert document._exact_response(text) is None
        _assert_same(text)


@PROPERTY_SETTINGS
@given(_responses())
def test_responses_near_the_exact_forms_decode_as_by_the_general_path(text: str) -> None:
    _assert_same(text)


@PROPERTY_SETTINGS
@given(st.text(max_size=64))
def test_arbitrary_text_after_an_exact_prefix_decodes_as_by_the_general_path(tail: str) -> None:
    _assert_same('{"encoding":"pkcs7","signature":"' + tail)
    _assert_same('{"encoding": "pkcs7", "signature": "' + tail + '"}')


# --- parse_signed_data_cached against parse_signed_data -------------------------------------------------


def _warm_cache() -> SignedDataCache:
    tails = SignedDataCache(256)
    for fixture in FIXTURES:
        parse_signed_data_cached(fixture.der, tails)
    return tails


def _assert_same_parse(der: bytes, tails: SignedDataCache) -> None:
    assert _outcome(parse_signed_data_cached, der, tails) == _outcome(parse_signed_data, der)


def _tlv(identifier: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((identifier, length)) + body
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((identifier, 0x80 | len(size))) + size + body


def _with_content(data: bytes, content: bytes) -> bytes:
    """The document ``data`` re-encoded around other content (its signature no longer fits; its DER does)."""
    top = der.whole(data, "test")
    oid_, wrapper = der.spans(data, top[2], top[3], "test")
    (signed_data,) = der.spans(data, wrapper[2], wrapper[3], "test")
    version, algorithms, encap, *tail = der.spans(data, signed_data[2], signed_data[3], "test")
    content_type = der.spans(data, encap[2], encap[3], "test")[0]
    encoded = (data[version[1]:version[3]] + data[algorithms[1]:algorithms[3]]
               + _tlv(0x30, data[content_type[1]:content_type[3]] + _tlv(0xA0, _tlv(0x04, content)))
               + data[tail[0][1]:])
    return _tlv(0x30, data[oid_[1]:oid_[3]] + _tlv(0xA0, _tlv(0x30, encoded)))


def test_a_document_of_a_remembered_layout_is_read_from_it() -> None:
    cache = _warm_cache()
    remembered = len(cache)
    for fixture in FIXTURES:
        signed = parse_signed_data(fixture.der)
        index = fixture.der.rindex(signed.signature)
        flipped = bytes(reversed(signed.signature))
        other = fixture.der[:index] + flipped + fixture.der[index + len(signed.signature):]
        other = other.replace(signed.content, bytes(reversed(signed.content)))
        _assert_same_parse(fixture.der, cache)
        _assert_same_parse(other, cache)
        assert parse_signed_data_cached(other, cache).signature == flipped
        assert parse_signed_data_cached(other, cache).content == bytes(reversed(signed.content))
    # Every parse above found its layout: a miss would have remembered one more.
    assert len(cache) == remembered


def test_a_document_of_a_remembered_tail_is_read_from_it_whatever_its_content_length() -> None:
    for fixture in FIXTURES:
        cache = SignedDataCache(256)
        signed = parse_signed_data_cached(fixture.der, cache)
        assert _with_content(fixture.der, signed.content) == fixture.der
        for content in (signed.content + b" ", signed.content[:-1], signed.content * 2, b"{}", b"x" * 1000):
            other = _with_content(fixture.der, content)
            remembered = len(cache)
            _assert_same_parse(other, cache)
            # The tail was found: only the new layout is remembered, which the next parse uses.
            assert len(cache) == remembered + 1
            _assert_same_parse(other, cache)
            assert len(cache) == remembered + 1
            assert parse_signed_data_cached(other, cache) == dataclasses.replace(signed, content=content)


#: A generated document, one with signed attributes, an ECDSA one and a real one (when present).
_EXHAUSTIVE = [f for f in FIXTURES if f.name in ("ok-rsa", "ok-signed-attributes", "ok-ecdsa-p256")] + FIXTURES[-1:]


@pytest.mark.parametrize("fixture", _EXHAUSTIVE, ids=[f.name for f in _EXHAUSTIVE])
def test_every_single_byte_change_parses_as_by_the_general_walk(fixture: Fixture) -> None:
    tails = _warm_cache()
    der = fixture.der
    for index in range(len(der)):
        for mask in (0x01, 0x80, 0xFF):
            _assert_same_parse(der[:index] + bytes((der[index] ^ mask,)) + der[index + 1:], tails)
        _assert_same_parse(der[:index], tails)
        _assert_same_parse(der[:index] + der[index + 1:], tails)
        _assert_same_parse(der[:index] + b"\x00" + der[index:], tails)


@PROPERTY_SETTINGS
@given(mutants())
def test_mutants_parse_as_by_the_general_walk(mutant: tuple[Fixture, bytes]) -> None:
    _assert_same_parse(mutant[1], _WARM)


_WARM = _warm_cache()


# --- Base64Cache.decode against strict a2b_base64 -----------------------------------------------------


def _strict_outcome(text: str) -> tuple[str, object]:
    try:
        return "ok", binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:
        return type(exc).__name__, str(exc)


def _cache_outcome(cache: document.Base64Cache, text: str) -> tuple[str, object]:
    try:
        return "ok", cache.decode(text)
    except ValueError as exc:
        return type(exc).__name__, str(exc)


#: The signatures the stretch tests start from: a real document's and a generated one's.
_TEXTS = [base64.b64encode(FIXTURES[-1].der).decode("ascii"), base64.b64encode(FIXTURES[0].der).decode("ascii")]


def _learned(text: str, start: int, stop: int) -> document.Base64Cache:
    """A cache that has learned ``text``'s bytes ``start:stop`` as shared."""
    cache = document.Base64Cache(16, lambda data: (start, stop))
    assert cache.decode(text) == binascii.a2b_base64(text)
    return cache


#: Single characters to put anywhere: padding, whitespace, the other base64 alphabets, non-ASCII.
_CHARACTERS = ["=", " ", "\n", "\r", "\t", "-", "_", ".", "\x00", "é", "\u0660", "A", "/", "+"]


@st.composite
def _near_texts(draw: st.DrawFn) -> tuple[str, int, int, str]:
    text = draw(st.sampled_from(_TEXTS))
    length = len(text) // 4 * 3
    start = draw(st.integers(0, length // 2))
    stop = draw(st.integers(start + 400, length))
    changed = text
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.sampled_from([0, 1, 2, 3, start * 4 // 3, stop * 4 // 3, len(text) - 1, len(text) - 2,
                                   len(text) - 3, draw(st.integers(0, len(text) - 1))]))
        at = max(0, min(len(text) - 1, at + draw(st.integers(-4, 4))))
        kind = draw(st.sampled_from(["replace", "shift", "pad"]))
        if kind == "replace":
            changed = changed[:at] + draw(st.sampled_from(_CHARACTERS)) + changed[at + 1:]
        elif kind == "shift":
            # Same length: one character out here, one in elsewhere.
            other = draw(st.integers(0, len(text) - 1))
            changed = changed[:at] + changed[at + 1:]
            changed = changed[:other] + draw(st.sampled_from(_CHARACTERS)) + changed[other:]
        else:
            changed = changed[:at] + "=" * draw(st.integers(1, 3)) + changed[at + 3:]
            changed = changed[:len(text)]
    return text, start, stop, changed


@PROPERTY_SETTINGS
@given(_near_texts())
def test_texts_near_a_learned_stretch_decode_as_strict_base64(case: tuple[str, int, int, str]) -> None:
    text, start, stop, changed = case
    cache = _learned(text, start, stop)
    assert _cache_outcome(cache, changed) == _strict_outcome(changed)


def test_a_learned_stretch_is_used_for_a_signature_of_the_same_length() -> None:
    text = _TEXTS[0]
    # The stretch ends before the signature value (the document's last 256 bytes), whatever the document's
    # length: a generated one (when the real documents are not at hand) is shorter than a real one.
    cache = _learned(text, 30, min(2000, len(binascii.a2b_base64(text)) - 300))
    # A different signature value at the end, the same stretch: the decode uses it (learning nothing new).
    other = text[:-12] + text[-12:-4][::-1] + text[-4:]
    assert cache.decode(other) == binascii.a2b_base64(other, strict_mode=True)
    # A miss would have learned the stretch a second time.
    assert len(cache._stretches[len(text)]) == 1
    for index in range(len(text)):
        for character in ("=", "-", " "):
            changed = text[:index] + character + text[index + 1:]
            assert _cache_outcome(cache, changed) == _strict_outcome(changed), index


def test_the_verifier_decodes_as_decode() -> None:
    for fixture in FIXTURES:
        encoded = base64.b64encode(fixture.der).decode("ascii")
        response = json.dumps({"encoding": "pkcs7", "signature": encoded})
        for _ in range(3):
            assert fixture.verifier.decode(response) == _decode_document(response) == fixture.der
            fixture.verifier.verify(fixture.verifier.decode(response), policy=VerificationPolicy(), now=fixture.now)
        flipped = encoded[:-8] + encoded[-8:-4][::-1] + encoded[-4:]
        response = json.dumps({"encoding": "pkcs7", "signature": flipped})
        assert _outcome(fixture.verifier.decode, response) == _outcome(_decode_document, response)


# --- parse_timestamp against the constructor it replaced -----------------------------------------------


def _timestamp_by_constructor(text: str, what: str) -> datetime:
    match = claims._TIMESTAMP.fullmatch(text)
    if match is None:
        raise MalformedDocument(f"{what}: {text[:40]!r} is not in IMDS's MM/DD/YY HH:MM:SS -0000 format")
    month, day, year, hour, minute, second = map(int, match.groups())
    try:
        return datetime(2000 + year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise MalformedDocument(f"{what}: {text!r} is not a real instant") from exc


def _assert_same_timestamp(text: str) -> None:
    expected = _outcome(_timestamp_by_constructor, text, "createdOn")
    assert _outcome(claims.parse_timestamp, text, "createdOn") == expected
    if expected[0] == "ok":
        assert claims.parse_timestamp(text, "createdOn").tzinfo is UTC


def test_every_day_of_leap_and_common_years_and_every_edge_field_parses_as_by_the_constructor() -> None:
    for year in (0, 23, 24, 26, 99):
        for month in range(14):
            for day in range(33):
                _assert_same_timestamp(f"{month:02}/{day:02}/{year:02} 12:00:00 -0000")
    for hour in (0, 23, 24, 99):
        for minute in (0, 59, 60, 99):
            for second in (0, 59, 60, 61, 99):
                _assert_same_timestamp(f"02/29/24 {hour:02}:{minute:02}:{second:02} -0000")


_TIMESTAMP_LIKE = st.from_regex(r"[0-9]{2}/[0-9]{2}/[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} -0000", fullmatch=True)


@PROPERTY_SETTINGS
@given(_TIMESTAMP_LIKE | st.text(max_size=30))
def test_timestamps_parse_as_by_the_constructor(text: str) -> None:
    _assert_same_timestamp(text)


def test_the_caches_stay_within_their_bounds_whatever_the_input() -> None:
    cache = SignedDataCache(8)
    stretches = document.Base64Cache(8, cache.shared)
    base = FIXTURES[-1].der
    content = parse_signed_data(base).content
    for size in range(40):
        data = _with_content(base, content + b" " * size)
        for _ in range(2):
            text = base64.b64encode(data).decode("ascii")
            assert stretches.decode(text) == data
            assert parse_signed_data_cached(data, cache) == parse_signed_data(data)
        tails = sum(map(len, cache._tails.values()))
        assert tails <= 8
        assert len(cache._layouts) <= 8
        assert sum(map(len, stretches._stretches.values())) <= 8


# --- what the verifier's caches keep ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong-signature", "attack-own-cert-first", "attack-lookalike-chain",
                                  "attack-genuine-sid-attacker-key", "leaf-is-ca"])
def test_only_documents_that_chain_to_the_pins_take_room_in_the_caches(case: str) -> None:
    # A document need only parse, or be signed with its sender's own key, to reach the signature check:
    # such documents must not fill the layout caches (each entry holds a whole document).
    index = json.loads((TESTCASES / "index.json").read_text(encoding="utf-8"))["cases"]
    verifier = Verifier(load_trust(TESTCASES / "pinned"))
    refused = index[case]
    at = datetime.fromisoformat(refused["at"])
    with pytest.raises(AttestError) as caught:
        verifier.verify_response((TESTCASES / refused["file"]).read_bytes(), at=at)
    assert caught.value.code == refused["expect"]
    assert verifier.cached_layouts == 0
    genuine = index["ok-rsa"]
    verifier.verify_response((TESTCASES / genuine["file"]).read_bytes(), at=datetime.fromisoformat(genuine["at"]))
    assert verifier.cached_layouts > 0
