"""Where the store keeps its records: the key of each record, and the hash tag that puts related keys together.

The challenge and seen keys of one nonce share a hash tag (``attest:{<digest>}:ch`` and
``attest:{<digest>}:seen``), so they live in one cluster slot and one script may touch both. The tag is the
SHA-256 of the nonce rather than the nonce itself: a nonce is chosen by whoever called IMDS, and braces in
it would otherwise move the tag.
"""

from __future__ import annotations

import hashlib
from typing import Final

from attest_service.nonces.store import scope_tag

#: Prefix of every key this service writes.
KEY_PREFIX: Final = "attest"


def hash_tag(value: str) -> str:
    """The hash tag of the keys of ``value`` (a nonce, a client id): its SHA-256, in hex."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def challenge_key(nonce: str) -> str:
    """Key of the challenge record of ``nonce``."""
    return f"{KEY_PREFIX}:{{{hash_tag(nonce)}}}:ch"


def seen_key(nonce: str) -> str:
    """Key of the seen record of ``nonce`` (same hash tag, hence same cluster slot, as its challenge).

    One key per nonce, whatever the scopes it was claimed in: the per-VM claims are listed in its value.
    """
    return f"{KEY_PREFIX}:{{{hash_tag(nonce)}}}:seen"


def scoped_seen_key(nonce: str, scope: str) -> str:
    """Key of one VM's claim of a caller-chosen nonce, once the nonce's seen value lists its most VMs."""
    return f"{KEY_PREFIX}:{{{hash_tag(nonce)}}}:seen:{scope_tag(scope)}"


def retry_key(nonce: str, client_id: str, scope: str | None) -> str:
    """Key of the retry mark of ``client_id``'s claim of ``nonce`` in ``scope`` (same slot as the nonce's records).

    Named by a digest of the client id and the scope, so that only the same caller's claim of the same VM's
    document finds it (see accept.lua).
    """
    return tagged_retry_key(hash_tag(nonce), client_id, "" if scope is None else scope_tag(scope))


def tagged_retry_key(tag: str, client_id: str, scope_digest: str) -> str:
    """:func:`retry_key` from the nonce's hash tag and the scope's digest ("" for none), already computed."""
    caller = hashlib.sha256(f"{client_id}\0{scope_digest}".encode()).hexdigest()
    return f"{KEY_PREFIX}:{{{tag}}}:retry:{caller}"


def rate_key(client_id: str, window_index: int) -> str:
    """Key of one fixed rate window of ``client_id`` (all windows of a client share a slot)."""
    return f"{KEY_PREFIX}:rate:{{{hash_tag(client_id)}}}:{window_index}"
