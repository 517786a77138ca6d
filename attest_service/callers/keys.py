"""Who sent a request: the caller its API key names, or an anonymous caller counted by its source."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from attest_service.callers.policy import ANONYMOUS, AccessPolicy, CallerPolicy
from attest_service.errors import Unauthorized


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who sent the request: the client id the store records, the rate-limit key and the caller's policy."""

    client_id: str
    rate_key: str
    policy: CallerPolicy
    #: Where the request came from (:mod:`attest_service.callers.sources`), for the anonymous challenge limit.
    source: str

    @property
    def anonymous(self) -> bool:
        """Whether the caller presented no key."""
        return self.client_id == ANONYMOUS


def authenticate(authorization: str | None, source: str, *, api_keys: Mapping[str, tuple[bytes, ...]],
                 access: AccessPolicy) -> Caller:
    """Identify the caller from the ``Authorization`` header; ``source`` is where the request came from.

    ``api_keys`` holds each client's accepted key digests (SHA-256), ``access`` every caller's policy.

    A presented key must match; without one, the caller is anonymous when the policy admits anonymous
    callers, and counted per source. Raises :class:`Unauthorized` otherwise. Every configured digest is
    compared in constant time, without stopping at a match, so timing does not reveal which client a key
    is close to.
    """
    if authorization is None or not authorization.strip():
        if access.anonymous is None:
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        return Caller(client_id=ANONYMOUS, rate_key=f"{ANONYMOUS}@{source}", policy=access.anonymous,
                      source=source)
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("expected Authorization: Bearer <key>")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    matched: str | None = None
    for client_id, digests in api_keys.items():
        for expected in digests:
            if hmac.compare_digest(digest, expected):
                matched = client_id
    if matched is None:
        raise Unauthorized("the API key is not valid")
    return Caller(client_id=matched, rate_key=matched, policy=access.for_client(matched), source=source)
