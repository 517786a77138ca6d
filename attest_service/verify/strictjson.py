"""Strict JSON decoding for everything a caller sends: duplicate keys and non-JSON constants are refused.

Python's decoder keeps the last of duplicate keys and accepts ``NaN`` and ``Infinity``; another parser
reading the same bytes may keep the first key or refuse the constant, and a document must mean one thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from attest_service.errors import AttestError


def strict_decoder(error: Callable[[str], AttestError], what: str) -> json.JSONDecoder:
    """A decoder that raises ``error`` (naming ``what``) on a duplicate key or a non-JSON constant.

    Build it once: ``json.loads()`` with hooks constructs a new decoder on every call.
    """

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in items:
            if key in result:
                raise error(f"{what}: duplicate key {key[:40]!r}")
            result[key] = value
        return result

    def constant(token: str) -> object:
        raise error(f"{what}: {token} is not JSON")

    return json.JSONDecoder(object_pairs_hook=pairs, parse_constant=constant)
