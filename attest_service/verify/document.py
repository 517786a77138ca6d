"""Step 1: from what a caller holds to the PKCS7 DER bytes.

Accepted forms (IMDS documentation, "Attested data"): the response object
``{"encoding": "pkcs7", "signature": "<base64>"}`` or the bare base64 ``signature`` string. Base64 is
decoded strictly (RFC 4648 alphabet and padding; surrounding whitespace only).
"""

from __future__ import annotations

import binascii
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from attest_service.errors import MalformedDocument, UnsupportedDocument
from attest_service.verify.strictjson import strict_decoder

#: Largest base64 signature accepted, in characters. Azure's are about 4 KiB (3 KiB of DER); the
#: limit bounds the work a hostile caller can ask for while leaving room for longer chains.
MAX_SIGNATURE_CHARS: Final = 64 * 1024


_DECODER: Final = strict_decoder(MalformedDocument, "document")

#: The response object exactly as IMDS writes it (compact) and as ``json.dumps`` writes it, up to the opening
#: quote of the signature; the text after the signature is ``"}``. See :func:`_exact_response`.
_RESPONSE_PREFIXES: Final = ('{"encoding":"pkcs7","signature":"', '{"encoding": "pkcs7", "signature": "')
_RESPONSE_SUFFIX: Final = '"}'


#: Shortest shared stretch a :class:`Base64Cache` remembers, in base64 characters.
MIN_STRETCH_CHARS: Final = 512
#: Stretches of one signature length a :class:`Base64Cache` keeps.
STRETCHES_PER_LENGTH: Final = 4


def _strict(text: str) -> bytes:
    return binascii.a2b_base64(text, strict_mode=True)


@dataclass(frozen=True, slots=True)
class _Stretch:
    start: int
    text: str
    data: bytes


class Base64Cache:
    """Bounded memory of the base64 stretch the signatures of one signer's documents share, decoded.

    Documents of one layout (see :class:`~attest_service.verify.pkcs7.SignedDataCache`) are the same bytes
    at the same places but for their content and signature; their base64 signatures then share the
    text of those bytes (about 3 KiB of the 4 KiB: the signer's certificate), in whole 4-character groups
    at the same places. ``stretch`` tells, for a decoded document, which bytes its layout shares (or
    None); a later signature of the same length with the same text there decodes only the rest.

    Strict base64 decodes each group of 4 characters to 3 bytes independently, and after a group holding
    no ``=`` it is exactly where it was at the start of the text. So when the text before the stretch is
    whole groups without ``=`` and decodes strictly, and so does the text after it, the whole text
    decodes strictly to the concatenation. Anything else (an error included) is decoded whole, which gives
    the answer. Thread-safe.
    """

    def __init__(self, entries: int, stretch: Callable[[bytes], tuple[int, int] | None]) -> None:
        self._entries = entries
        self._stretch = stretch
        self._stretches: dict[int, tuple[_Stretch, ...]] = {}
        self._lock = threading.Lock()

    def decode(self, text: str) -> bytes:
        """``binascii.a2b_base64(text, strict_mode=True)``: the same bytes, or the same ValueError."""
        for stretch in self._stretches.get(len(text), ()):
            if text.startswith(stretch.text, stretch.start):
                head = text[:stretch.start]
                if "=" not in head:
                    try:
                        return _strict(head) + stretch.data + _strict(text[stretch.start + len(stretch.text):])
                    except ValueError:
                        pass
                break
        data = _strict(text)
        self._learn(text, data)
        return data

    def _learn(self, text: str, data: bytes) -> None:
        shared = self._stretch(data)
        if shared is None:
            return
        # The whole 3-byte groups inside the shared bytes, and their 4-character groups in the text.
        first, last = -(-shared[0] // 3), shared[1] // 3
        start, stop = first * 4, last * 4
        if stop - start < MIN_STRETCH_CHARS or "=" in text[:stop]:
            return
        stretch = _Stretch(start, text[start:stop], data[first * 3:last * 3])
        with self._lock:
            # At most ``entries`` stretches (about 5 KiB each) in all.
            if len(self._stretches) >= max(1, self._entries // STRETCHES_PER_LENGTH):
                self._stretches.clear()
            known = self._stretches.get(len(text), ())
            self._stretches[len(text)] = (stretch, *known[:STRETCHES_PER_LENGTH - 1])


def _decode_signature(signature: str, cache: Base64Cache | None = None) -> bytes:
    """Decode the base64 ``signature`` strictly; raise MalformedDocument for anything else.

    ``cache`` (a verifier's) decodes the same, faster for the signatures of documents it saw the layout of.
    """
    text = signature.strip()
    if not text:
        raise MalformedDocument("signature: empty")
    if len(text) > MAX_SIGNATURE_CHARS:
        raise MalformedDocument(f"signature: longer than {MAX_SIGNATURE_CHARS} characters")
    try:
        # a2b_base64 reads an ASCII str directly (no encoded copy); any other character is a ValueError.
        return _strict(text) if cache is None else cache.decode(text)
    except ValueError as exc:
        # binascii's own words ("number of data characters (5) cannot be 1 more than a multiple of 4") are
        # its internals; the sentence says what is expected.
        raise MalformedDocument("signature: not strict base64 (the standard alphabet, padded with '=' to a "
                                "multiple of 4 characters, nothing else)") from exc


def _decode_response(response: Mapping[str, object], cache: Base64Cache | None = None) -> bytes:
    """Decode an IMDS attested-document response object: ``encoding`` must be ``pkcs7``."""
    encoding = response.get("encoding")
    signature = response.get("signature")
    if not isinstance(signature, str):
        raise MalformedDocument("document: 'signature' is missing or not a string")
    if encoding != "pkcs7":
        if isinstance(encoding, str):
            raise UnsupportedDocument(f"document: encoding {encoding[:32]!r} is not 'pkcs7'")
        raise MalformedDocument("document: 'encoding' is missing or not a string")
    return _decode_signature(signature, cache)


def _exact_response(text: str, cache: Base64Cache | None = None) -> bytes | None:
    """The DER of a response in one of the exact forms above, or None to take the general path.

    Returns only what the general path (strict JSON, then :func:`_decode_response`) returns for the same
    text, and None for everything else, errors included, so that every refusal comes from the general path
    with its own message. It skips the JSON scan of the 4 KiB signature: when the strict base64 decode of
    the text between the prefix and the suffix succeeds, that text holds only base64 characters (no quote,
    backslash, control character or whitespace), so the text is exactly the JSON object
    ``{"encoding": "pkcs7", "signature": <that text>}`` and its signature needs no stripping.
    """
    if not text.endswith(_RESPONSE_SUFFIX):
        return None
    for prefix in _RESPONSE_PREFIXES:
        if text.startswith(prefix):
            signature = text[len(prefix):-len(_RESPONSE_SUFFIX)]
            break
    else:
        return None
    if not signature or len(signature) > MAX_SIGNATURE_CHARS:
        return None
    try:
        return _strict(signature) if cache is None else cache.decode(signature)
    except ValueError:
        return None


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Where JSON text stops being JSON, in our words (the decoder's own message is for the log)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"unreadable at character {exc.pos}"
    return "unreadable"


def _decode_json(text: str, cache: Base64Cache | None = None) -> bytes:
    """The general path for a response object as JSON text (stripped): strict JSON, then _decode_response."""
    if len(text) > MAX_SIGNATURE_CHARS * 2:
        raise MalformedDocument("document: too large")
    try:
        response = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MalformedDocument):
            raise
        raise MalformedDocument(f"document: not JSON ({_json_problem(exc)})") from exc
    if not isinstance(response, dict):
        raise MalformedDocument("document: not a JSON object")
    return _decode_response(response, cache)


def _decode_document(data: bytes | str, cache: Base64Cache | None = None) -> bytes:
    """Decode either text form (as read from a file or standard input) to DER."""
    if isinstance(data, bytes):
        if len(data) > MAX_SIGNATURE_CHARS * 2:
            raise MalformedDocument("document: too large")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedDocument("document: not UTF-8 text") from exc
    text = data.strip()
    if text.startswith("{"):
        exact = _exact_response(text, cache)
        return exact if exact is not None else _decode_json(text, cache)
    return _decode_signature(text, cache)


def decode(response: Mapping[str, object] | str | bytes, cache: Base64Cache | None = None) -> bytes:
    """Decode what a caller holds to DER: the IMDS response as a mapping, as JSON text or bytes, or bare base64.

    This is the one entry for documents; anything else (a list, a number, ``None``) is malformed. ``cache``
    (a verifier's) decodes the same, faster for the signatures of documents it saw the layout of.
    """
    if type(response) is str:
        # The common case first, by exact type: a str is never a Mapping, and the ABC check costs more.
        return _decode_document(response, cache)
    if isinstance(response, Mapping):
        return _decode_response(response, cache)
    if isinstance(response, str | bytes):
        return _decode_document(response, cache)
    raise MalformedDocument(f"document: expected the IMDS response or its signature, not {type(response).__name__}")
