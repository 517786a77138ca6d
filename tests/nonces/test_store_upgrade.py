"""A rolling upgrade runs an earlier release beside this one, on one store.

The release before claim tokens and scopes, and the one that listed every VM of a nonce in its seen value.

Both directions must refuse replays: a record the previous release wrote refuses every claim of this one, and
a record this one wrote (a per-VM claim included) is a replay to the previous release. The previous release is
run for real: its accept script (Redis) and its decision query (SQLite), copied here verbatim.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Final

import pytest
import redis

from attest_service.errors import NonceReplayed
from attest_service.nonces import NonceStore, open_store
from attest_service.nonces.redis.keys import challenge_key, scoped_seen_key, seen_key
from attest_service.nonces.redis.scripts import ACCEPT_SCRIPT, MAX_LISTED_SCOPES
from attest_service.nonces.store import epoch_ms, scope_tag
from tests.support.redis_server import RedisServer

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

Unique = Callable[[str], str]
VM: Final = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
LIFETIME: Final = timedelta(minutes=10)

#: The accept script of the previous release (attest_service/nonces/redis_store.py, before claim tokens).
PREVIOUS_ACCEPT_LUA: Final = """
local seen = redis.call('GET', KEYS[2])
if seen then
  local sep = string.find(seen, '|', 1, true)
  return {'replayed', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
end
local challenge = redis.call('GET', KEYS[1])
if challenge then
  local sep = string.find(challenge, '|', 1, true)
  if string.sub(challenge, sep + 1) ~= ARGV[1] then
    return {'foreign'}
  end
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1|' .. ARGV[1], 'PX', ARGV[3])
  return {'challenge'}
end
if ARGV[2] == '1' then
  return {'unknown'}
end
redis.call('SET', KEYS[2], '0|' .. ARGV[1], 'PX', ARGV[3])
return {'seen'}
"""

#: The decision query of the previous release's SQLite store: any live row of the nonce is a replay.
PREVIOUS_SEEN_QUERY: Final = "SELECT client_id, challenge FROM seen WHERE nonce = ? AND expires_ms > ?"


def accept(store: NonceStore, nonce: str, *, scope: str | None = VM, require_challenge: bool = False) -> None:
    now = utcnow()
    store.accept(nonce, client_id="client", expires_at=now + LIFETIME, require_challenge=require_challenge,
                 now=now, scope=scope)


# --- Redis ---------------------------------------------------------------------------------------------


@pytest.fixture
def redis_pair(standalone_redis: RedisServer) -> Iterator[tuple[NonceStore, redis.Redis]]:
    store = open_store(standalone_redis.url, timeout_seconds=TIMEOUT_SECONDS)
    client = standalone_redis.client()
    yield store, client
    client.close()
    store.close()


def previous_release_accepts(client: redis.Redis, nonce: str, *, require_challenge: bool = False) -> str:
    """Run the previous release's accept script; its first answer word (``seen``, ``replayed``, ...)."""
    reply = client.eval(PREVIOUS_ACCEPT_LUA, 2, challenge_key(nonce), seen_key(nonce), "client",
                        "1" if require_challenge else "0", str(int(LIFETIME.total_seconds() * 1000)))
    return bytes(reply[0]).decode()


@requires_redis
@pytest.mark.parametrize("kind", ["caller nonce", "challenge"])
def test_redis_records_of_the_previous_release_refuse_every_claim(
        redis_pair: tuple[NonceStore, redis.Redis], unique: Unique, kind: str) -> None:
    store, client = redis_pair
    nonce = unique(kind.replace(" ", "-"))
    if kind == "challenge":
        client.set(challenge_key(nonce), f"{epoch_ms(utcnow() + LIFETIME)}|client", px=600_000)
    assert previous_release_accepts(client, nonce) == ("challenge" if kind == "challenge" else "seen")
    for scope in (VM, "another-vm", None):
        with pytest.raises(NonceReplayed):
            accept(store, nonce, scope=scope)


@requires_redis
@pytest.mark.parametrize("scope", [VM, None])
def test_redis_records_of_this_release_are_replays_to_the_previous(
        redis_pair: tuple[NonceStore, redis.Redis], unique: Unique, scope: str | None) -> None:
    store, client = redis_pair
    caller_nonce, consumed = unique("caller-nonce"), unique("consumed")
    accept(store, caller_nonce, scope=scope)
    store.issue_challenge(consumed, client_id="client", expires_at=utcnow() + LIFETIME)
    accept(store, consumed, scope=scope, require_challenge=True)
    if scope is not None:
        accept(store, caller_nonce, scope="another-vm")  # a second VM in the same record
    assert previous_release_accepts(client, caller_nonce) == "replayed"
    assert previous_release_accepts(client, consumed) == "replayed"
    assert previous_release_accepts(client, consumed, require_challenge=True) == "replayed"


# --- SQLite --------------------------------------------------------------------------------------------


#: The previous release's schema of the seen table, as a file written by it has it.
PREVIOUS_SCHEMA: Final = """
CREATE TABLE seen (
    nonce      TEXT PRIMARY KEY,
    client_id  TEXT NOT NULL,
    challenge  INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX seen_expiry ON seen (expires_ms);
"""


def test_sqlite_rows_of_the_previous_release_refuse_every_claim(tmp_path: Path, unique: Unique) -> None:
    path = tmp_path / "n.sqlite3"
    expires = epoch_ms(utcnow() + LIFETIME)
    with sqlite3.connect(path) as previous:
        previous.executescript(PREVIOUS_SCHEMA)
        previous.executemany("INSERT INTO seen (nonce, client_id, challenge, expires_ms) VALUES (?, 'client', ?, ?)",
                             [("old-caller-nonce", 0, expires), ("old-challenge", 1, expires)])
    store = open_store(f"sqlite:///{path}", timeout_seconds=TIMEOUT_SECONDS)
    try:
        for nonce in ("old-caller-nonce", "old-challenge"):
            for scope in (VM, "another-vm", None):
                with pytest.raises(NonceReplayed):
                    accept(store, nonce, scope=scope)
        accept(store, unique("fresh"))  # the file was upgraded in place (the per-VM table added)
    finally:
        store.close()


@pytest.mark.parametrize("scope", [VM, None])
def test_sqlite_rows_of_this_release_are_replays_to_the_previous(tmp_path: Path, unique: Unique,
                                                                 scope: str | None) -> None:
    path = tmp_path / "n.sqlite3"
    store = open_store(f"sqlite:///{path}", timeout_seconds=TIMEOUT_SECONDS)
    caller_nonce, consumed = unique("caller-nonce"), unique("consumed")
    try:
        accept(store, caller_nonce, scope=scope)
        if scope is not None:
            accept(store, caller_nonce, scope="another-vm")  # a second VM on the same nonce row
        store.issue_challenge(consumed, client_id="client", expires_at=utcnow() + LIFETIME)
        accept(store, consumed, scope=scope, require_challenge=True)
    finally:
        store.close()
    with sqlite3.connect(path) as previous:
        now_ms = epoch_ms(utcnow())
        for nonce in (caller_nonce, consumed):
            assert previous.execute(PREVIOUS_SEEN_QUERY, (nonce, now_ms)).fetchone() is not None, nonce


# The accept script of the release before per-VM keys (it lists every VM of a nonce in its seen value), verbatim:
# a rolling upgrade runs it beside this release's.
LISTING_RELEASE_ACCEPT_LUA: Final = """
local function record(value, previous)
  local ttl = tonumber(ARGV[3])
  if previous then
    local left = redis.call('PTTL', KEYS[2])
    if left > ttl then ttl = left end
  end
  redis.call('SET', KEYS[2], value, 'PX', ttl)
end
local seen = redis.call('GET', KEYS[2])
if seen then
  local kind = string.sub(seen, 1, 1)
  if kind == 'C' or kind == 'N' then
    local sep = string.find(seen, '|', 3, true)
    local challenge = kind == 'C' and '1' or '0'
    if string.sub(seen, 3, sep - 1) == ARGV[4] then
      redis.call('SET', KEYS[2], seen, 'KEEPTTL')
      return {'accepted', challenge}
    end
    return {'replayed', challenge, string.sub(seen, sep + 1)}
  elseif kind == 'V' then
    if ARGV[5] == '' then
      return {'replayed', '0', ''}
    end
    local at = string.find(seen, ARGV[5] .. ':', 3, true)
    if at then
      local entry = ARGV[5] .. ':' .. ARGV[4]
      if string.sub(seen, at, at + #entry - 1) == entry then
        redis.call('SET', KEYS[2], seen, 'KEEPTTL')
        return {'accepted', '0'}
      end
      return {'replayed', '0', ''}
    end
  else
    local sep = string.find(seen, '|', 1, true)
    return {'replayed', string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)}
  end
end
local challenge = redis.call('GET', KEYS[1])
if challenge then
  local sep = string.find(challenge, '|', 1, true)
  if string.sub(challenge, sep + 1) ~= ARGV[1] then
    return {'foreign'}
  end
  redis.call('DEL', KEYS[1])
  record('C|' .. ARGV[4] .. '|' .. ARGV[1], seen)
  return {'challenge'}
end
if ARGV[2] == '1' then
  return {'unknown'}
end
if ARGV[5] == '' then
  record('N|' .. ARGV[4] .. '|' .. ARGV[1], seen)
elseif seen then
  record(seen .. ',' .. ARGV[5] .. ':' .. ARGV[4], seen)
else
  record('V|' .. ARGV[5] .. ':' .. ARGV[4], seen)
end
return {'seen'}
"""


def test_a_vm_with_its_own_key_is_a_replay_to_the_listing_release(server: RedisServer) -> None:
    # Nine VMs on one nonce: the ninth has its own key, which the listing release does not read. It must not
    # accept that VM's document again: it sees the full list's kind as unknown and refuses it as a replay.
    client = server.client()
    nonce = "fleet-nonce"
    vms = [f"vm-{index}" for index in range(MAX_LISTED_SCOPES + 1)]
    for index, vm in enumerate(vms):
        keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, vm)]
        assert ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", f"token-{index}", scope_tag(vm),
                                                 MAX_LISTED_SCOPES]) == [b"seen"]
    for vm in (vms[0], vms[-1], "vm-new"):
        reply = client.eval(LISTING_RELEASE_ACCEPT_LUA, 2, challenge_key(nonce), seen_key(nonce), "c", "0",
                            "60000", "other-token", scope_tag(vm))
        assert reply[0] == b"replayed", (vm, reply)
    # This release still tells the listed VMs, the VMs with a key and new VMs apart.
    for vm, expected in ((vms[0], b"replayed"), (vms[-1], b"replayed"), ("vm-new", b"seen")):
        keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, vm)]
        assert ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", "again", scope_tag(vm),
                                                 MAX_LISTED_SCOPES])[0] == expected
    client.close()
