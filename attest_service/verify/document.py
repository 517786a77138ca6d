"""Step 1: from what a caller holds to the PKCS7 DER bytes.

Accepted forms (IMDS documentation, "Attested data"): the response object
``{"encoding": "pkcs7", "signature": "<base64>"}`` or the bare base64 ``signature`` string. Base64 is
decoded strictly (RFC 4648 alphabet and padding; surrounding whitespace only).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
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


def decode_signature(signature: str) -> bytes:
    """Decode the base64 ``signature`` strictly; raise MalformedDocument for anything else."""
    text = signature.strip()
    if not text:
        raise MalformedDocument("signature: empty")
    if len(text) > MAX_SIGNATURE_CHARS:
        raise MalformedDocument(f"signature: longer than {MAX_SIGNATURE_CHARS} characters")
    try:
        # a2b_base64 reads an ASCII str directly (no encoded copy); any other character is a ValueError.
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:
        raise MalformedDocument(f"signature: not strict base64 ({exc})") from exc


def decode_response(response: Mapping[str, object]) -> bytes:
    """Decode an IMDS attested-document response object: ``encoding`` must be ``pkcs7``."""
    encoding = response.get("encoding")
    signature = response.get("signature")
    if not isinstance(signature, str):
        raise MalformedDocument("document: 'signature' is missing or not a string")
    if encoding != "pkcs7":
        if isinstance(encoding, str):
            raise UnsupportedDocument(f"document: encoding {encoding[:32]!r} is not 'pkcs7'")
        raise MalformedDocument("document: 'encoding' is missing or not a string")
    return decode_signature(signature)


def _exact_response(text: str) -> bytes | None:
    """The DER of a response in one of the exact forms above, or None to take the general path.

    Returns only what the general path (strict JSON, then :func:`decode_response`) returns for the same
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
        return binascii.a2b_base64(signature, strict_mode=True)
    except ValueError:
        return None


def _decode_json(text: str) -> bytes:
    """The general path for a response object as JSON text (stripped): strict JSON, then decode_response."""
    if len(text) > MAX_SIGNATURE_CHARS * 2:
        raise MalformedDocument("document: too large")
    try:
        response = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MalformedDocument):
            raise
        raise MalformedDocument(f"document: not JSON ({exc})") from exc
    if not isinstance(response, dict):
        raise MalformedDocument("document: not a JSON object")
    return decode_response(response)


def decode_document(data: bytes | str) -> bytes:
    """Decode either accepted form (as read from a file or standard input) to DER."""
    if isinstance(data, bytes):
        if len(data) > MAX_SIGNATURE_CHARS * 2:
            raise MalformedDocument("document: too large")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedDocument("document: not UTF-8 text") from exc
    text = data.strip()
    if text.startswith("{"):
        exact = _exact_response(text)
        return exact if exact is not None else _decode_json(text)
    return decode_signature(text)


def decode_input(response: Mapping[str, object] | str | bytes) -> bytes:
    """Decode what a caller holds to DER: the IMDS response as a mapping, as JSON text or bytes, or bare base64.

    This is the library's one entry for documents; anything else (a list, a number, ``None``) is malformed.
    """
    if type(response) is str:
        # The common case first, by exact type: a str is never a Mapping, and the ABC check costs more.
        return decode_document(response)
    if isinstance(response, Mapping):
        return decode_response(response)
    if isinstance(response, str | bytes):
        return decode_document(response)
    raise MalformedDocument(f"document: expected the IMDS response or its signature, not {type(response).__name__}")
