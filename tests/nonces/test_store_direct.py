"""The store's direct use of redis-py connections: the same bytes on the wire, the same recovery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Final

import pytest
import redis

from attest_service.errors import NonceReplayed, StoreUnavailable
from attest_service.nonces import Acceptance, NonceStore, open_store
from attest_service.nonces.redis_store import (
    _ACCEPT_SCRIPT,
    MAX_LISTED_SCOPES,
    challenge_key,
    pack_command,
    scoped_seen_key,
    seen_key,
)
from attest_service.nonces.store import scope_tag
from tests.support.redis_server import RedisServer, redis_server

from .conftest import TIMEOUT_SECONDS, requires_redis, utcnow

pytestmark = requires_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as running:
        yield running


@pytest.fixture
def store(server: RedisServer) -> Iterator[NonceStore]:
    opened = open_store(server.url, timeout_seconds=TIMEOUT_SECONDS)
    yield opened
    opened.close()


def accept(store: NonceStore, nonce: str) -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id="client", expires_at=now + timedelta(minutes=5), require_challenge=False,
                        now=now, scope="vm")


@pytest.mark.parametrize("args", [
    ("EVALSHA", "0" * 40, 2, "attest:{a}:ch", "attest:{a}:seen", "client", "0", "360000", "tok", ""),
    ("EVAL", "return 1", 0),
    ("SET", "clé", "välue ☃", "PX", 10**12),
    ("GET", ""),
])
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[str | int, ...]) -> None:
    connection = redis.Redis().connection_pool.make_connection()
    assert pack_command(*args) == b"".join(connection.pack_command(*args))


def test_connections_killed_by_the_server_are_remade(store: NonceStore, server: RedisServer) -> None:
    accept(store, "before")
    admin = server.client()
    # Every connection but this one is dropped by the server, as after a restart or an idle timeout.
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert accept(store, "after") == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed):
        accept(store, "after")
    admin.close()


def test_close_disconnects_the_store(store: NonceStore, server: RedisServer) -> None:
    accept(store, "one")
    admin = server.client()
    before = len(admin.client_list())
    store.close()
    assert len(admin.client_list()) < before
    admin.close()


def test_a_script_the_server_forgot_is_sent_again_in_full(store: NonceStore, server: RedisServer) -> None:
    accept(store, "first")
    admin = server.client()
    admin.script_flush()
    assert accept(store, "second") == Acceptance(challenge=False)
    admin.close()


def test_a_nonce_shared_by_a_fleet_keeps_its_seen_value_small(store: NonceStore, server: RedisServer) -> None:
    # A vendor's fixed nonce, used by every VM: the listed VMs stop at MAX_LISTED_SCOPES, the others get a key
    # each, so neither the value nor the work of a claim grows with the fleet.
    vms = [f"00000000-0000-4000-8000-{index:012d}" for index in range(40)]
    for vm in vms:
        now = utcnow()
        assert store.accept("license-v1", client_id="vendor", expires_at=now + timedelta(minutes=5),
                            require_challenge=False, now=now, scope=vm) == Acceptance(challenge=False)
    admin = server.client()
    listed = admin.get(seen_key("license-v1"))
    assert listed is not None
    assert listed.count(b",") + 1 == MAX_LISTED_SCOPES
    own = [scoped_seen_key("license-v1", vm) for vm in vms[MAX_LISTED_SCOPES:]]
    assert all(admin.exists(key) for key in own)
    lifetimes = [admin.pttl(key) for key in own]
    # The list lives as long as the longest claim (read after the claims' lifetimes: a few ms later).
    assert min(lifetimes) > 0
    assert max(lifetimes) <= admin.pttl(seen_key("license-v1")) + 50
    for vm in (vms[0], vms[MAX_LISTED_SCOPES - 1], vms[MAX_LISTED_SCOPES], vms[-1]):
        now = utcnow()
        with pytest.raises(NonceReplayed):
            store.accept("license-v1", client_id="other", expires_at=now + timedelta(minutes=5),
                         require_challenge=False, now=now, scope=vm)
    admin.close()


def test_a_resent_claim_of_a_vm_with_its_own_key_is_its_acceptance(server: RedisServer) -> None:
    # What redis-py or the direct connections send again after a lost answer: the same script, same token.
    client = server.client()
    nonce = "resent"
    for index in range(MAX_LISTED_SCOPES):
        keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, f"vm-{index}")]
        _ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", f"token-{index}", scope_tag(f"vm-{index}"),
                                          MAX_LISTED_SCOPES])
    keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, "late-vm")]
    args = ["c", "0", "60000", "late-token", scope_tag("late-vm"), MAX_LISTED_SCOPES]
    assert _ACCEPT_SCRIPT.run(client, keys, args) == [b"seen"]
    assert _ACCEPT_SCRIPT.run(client, keys, args) == [b"accepted", b"0"]
    assert _ACCEPT_SCRIPT.run(client, keys, [*args[:3], "another-token", *args[4:]])[0] == b"replayed"
    client.close()


def test_an_outage_longer_than_the_pool_recovers(server: RedisServer) -> None:
    # Every failed call during an outage used to cost one of the pool's 100 connection objects for good:
    # after the outage the store answered "Too many connections" for ever.
    store = open_store(server.url, timeout_seconds=TIMEOUT_SECONDS)
    try:
        accept(store, "before")
        server.stop()
        for index in range(250):
            with pytest.raises(StoreUnavailable) as refused:
                accept(store, f"down-{index}")
            assert "Too many connections" not in refused.value.message
        server.start()
        assert accept(store, "after") == Acceptance(challenge=False)
    finally:
        store.close()


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
        assert _ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", f"token-{index}", scope_tag(vm),
                                                 MAX_LISTED_SCOPES]) == [b"seen"]
    for vm in (vms[0], vms[-1], "vm-new"):
        reply = client.eval(LISTING_RELEASE_ACCEPT_LUA, 2, challenge_key(nonce), seen_key(nonce), "c", "0",
                            "60000", "other-token", scope_tag(vm))
        assert reply[0] == b"replayed", (vm, reply)
    # This release still tells the listed VMs, the VMs with a key and new VMs apart.
    for vm, expected in ((vms[0], b"replayed"), (vms[-1], b"replayed"), ("vm-new", b"seen")):
        keys = [challenge_key(nonce), seen_key(nonce), scoped_seen_key(nonce, vm)]
        assert _ACCEPT_SCRIPT.run(client, keys, ["c", "0", "60000", "again", scope_tag(vm),
                                                 MAX_LISTED_SCOPES])[0] == expected
    client.close()


def test_many_claims_at_once_leave_the_pool_to_the_other_commands(server: RedisServer) -> None:
    # As many claims in flight as the client pool holds (100): past its direct connections the store sends
    # through the pool, and once they are answered the pool still has room for challenges and readiness
    # checks (with a direct connection per claim, the pool had none left for them, for good).
    store = open_store(server.url, timeout_seconds=5.0)
    results: list[object] = []
    try:
        accept(store, "warm")
        threads = [threading.Thread(target=lambda index=index: results.append(accept(store, f"many-{index}")))
                   for index in range(100)]
        with server.frozen():
            for thread in threads:
                thread.start()
            time.sleep(0.5)  # every claim is now waiting on a connection that the frozen server does not answer
        for thread in threads:
            thread.join(timeout=10)
        assert results == [Acceptance(challenge=False)] * len(threads)
        store.ping()
        now = utcnow()
        store.issue_challenge("after-many", client_id="client", expires_at=now + timedelta(minutes=5), now=now)
    finally:
        store.close()
