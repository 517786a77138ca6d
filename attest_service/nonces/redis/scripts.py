"""The store's Lua scripts, each one decision that Redis runs atomically; their source is in the ``.lua`` files here.

The comment that heads each file documents its keys, arguments and replies; it is not sent to Redis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

from redis.exceptions import NoScriptError

from attest_service.errors import StoreUnavailable
from attest_service.nonces.redis.connection import DirectConnections, RedisClient, pack_command

#: VMs listed in a caller-chosen nonce's seen value; further VMs of that nonce get a key each (see accept.lua).
MAX_LISTED_SCOPES: Final = 8


def _source(name: str) -> str:
    """The script in the file ``name`` beside this module, without the comment lines that head it."""
    lines = resources.files(__package__).joinpath(name).read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("--"):
        start += 1
    return "".join(lines[start:])


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script run by its SHA-1 (``EVALSHA``), sent in full (``EVAL``) when the server does not know it yet.

    Loading on demand, per node, also covers a cluster node or a failed-over master that has never seen it.
    """

    source: str
    #: The digest Redis caches the script under (computed once, not for each claim).
    sha1: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode("utf-8"), usedforsecurity=False).hexdigest())

    def run(self, client: RedisClient, keys: Sequence[str], args: Sequence[str | int],
            direct: DirectConnections | None = None) -> list[bytes | int]:
        """Run with ``keys`` and ``args`` (on ``direct`` connections when given); returns the array reply."""
        reply: object = None
        if direct is not None:
            try:
                reply = direct.run(pack_command("EVALSHA", self.sha1, len(keys), *keys, *args))
            except NoScriptError:
                reply = direct.run(pack_command("EVAL", self.source, len(keys), *keys, *args))
        else:
            try:
                reply = client.execute_command("EVALSHA", self.sha1, len(keys), *keys, *args)
            except NoScriptError:
                reply = client.execute_command("EVAL", self.source, len(keys), *keys, *args)
        if not isinstance(reply, list):
            raise StoreUnavailable(f"unexpected reply from a nonce store script: {reply!r}")
        return reply



#: Claims a nonce (consumes its challenge, or records it as seen) or refuses it; see accept.lua.
ACCEPT_SCRIPT: Final = LuaScript(_source("accept.lua"))
#: Counts requests against a client's sliding rate window, as many as fit; see rate.lua.
RATE_SCRIPT: Final = LuaScript(_source("rate.lua"))
