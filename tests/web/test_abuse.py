"""Rate limits that hold behind a proxy and over IPv6, throttled key guessing, bounded anonymous state.

The requests come through Flask's test client with the peer address set per request; the budgets are
counted by the real SQLite and Redis stores.
"""

from __future__ import annotations

import ipaddress
import os
import time
from datetime import timedelta

import pytest
from flask.testing import FlaskClient

from attest_service.callers import sources
from attest_service.callers.sources import client_address, source_key
from attest_service.callers.throttle import FailedAuthBlocks
from attest_service.errors import ConfigurationError, RateLimited
from attest_service.settings import Settings, parse_trusted_proxies
from tests.support.redis_server import RedisServer
from tests.web.conftest import API_KEYS_ENV, NOW, AppFactory, Clock, bearer

PROXIES = parse_trusted_proxies("10.0.0.0/8, fd00::/8")


def _from(client: FlaskClient, path: str, peer: str, *, forwarded: str | None = None,
          headers: dict[str, str] | None = None) -> int:
    all_headers = {**(headers or {}), **({"X-Forwarded-For": forwarded} if forwarded is not None else {})}
    return client.post(path, headers=all_headers, environ_base={"REMOTE_ADDR": peer}).status_code


# --- where a request comes from ----------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "forwarded", "expected"), [
    # Not a trusted proxy: its header is the caller's own writing and ignored.
    ("198.51.100.7", ["203.0.113.1"], "198.51.100.7"),
    # A trusted proxy: the right-most address it did not write itself is the client.
    ("10.0.0.5", ["203.0.113.1"], "203.0.113.1"),
    # The client wrote the left-most entry; the ingress appended what it saw.
    ("10.0.0.5", ["6.6.6.6, 203.0.113.1"], "203.0.113.1"),
    # Two proxies in a row, and the header split over two fields.
    ("10.0.0.5", ["6.6.6.6, 203.0.113.1", "10.1.1.1"], "203.0.113.1"),
    # Ports and brackets as some proxies write them.
    ("10.0.0.5", ["203.0.113.1:4711"], "203.0.113.1"),
    ("10.0.0.5", ["[2001:db8::1]:443"], "2001:db8::1"),
    # A broken entry stops at the proxy that passed it on.
    ("10.0.0.5", ["not-an-address"], "10.0.0.5"),
    ("10.0.0.5", [], "10.0.0.5"),
    # Every hop trusted: the left-most is as close to the client as is known.
    ("10.0.0.5", ["10.2.2.2"], "10.2.2.2"),
    ("::ffff:10.0.0.5", ["203.0.113.9"], "203.0.113.9"),
])
def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == ipaddress.ip_address(expected)


def test_ipv6_sources_are_grouped_by_slash_64() -> None:
    assert source_key(ipaddress.ip_address("2001:db8:1:2:aaaa::1")) == "2001:db8:1:2::/64"
    assert source_key(ipaddress.ip_address("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
    assert source_key(ipaddress.ip_address("2001:db8:1:3::1")) == "2001:db8:1:3::/64"
    assert source_key(ipaddress.ip_address("192.0.2.1")) == "192.0.2.1"
    assert source_key(None) == "unknown"


@pytest.mark.parametrize(("value", "fragment"), [("10.0.0.1/8", "has host bits"), ("proxy.local", "not an address"),
                                                 ("0.0.0.0/0", "from anyone"), ("::/0", "from anyone")])
def test_trusted_proxies_are_validated(value: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Settings.from_env({"ATTEST_TRUSTED_PROXIES": value})


# --- budgets -----------------------------------------------------------------------------------------------


def test_anonymous_budgets_behind_a_trusted_proxy_are_per_client(make_client: AppFactory, store_url: str) -> None:
    client = make_client(store_url=store_url, ATTEST_RATE_LIMIT_PER_MINUTE="2", ATTEST_TRUSTED_PROXIES="10.0.0.0/8")
    for _ in range(2):
        assert _from(client, "/v1/challenges", "10.0.0.5", forwarded="203.0.113.1") == 201
    assert _from(client, "/v1/challenges", "10.0.0.5", forwarded="203.0.113.1") == 429
    # Another VM behind the same ingress has its own budget.
    assert _from(client, "/v1/challenges", "10.0.0.5", forwarded="203.0.113.2") == 201


def test_forwarded_header_from_an_untrusted_peer_changes_nothing(make_client: AppFactory, store_url: str) -> None:
    client = make_client(store_url=store_url, ATTEST_RATE_LIMIT_PER_MINUTE="2", ATTEST_TRUSTED_PROXIES="10.0.0.0/8")
    assert _from(client, "/v1/challenges", "198.51.100.7", forwarded="203.0.113.1") == 201
    assert _from(client, "/v1/challenges", "198.51.100.7", forwarded="203.0.113.2") == 201
    assert _from(client, "/v1/challenges", "198.51.100.7", forwarded="203.0.113.3") == 429


def test_long_forwarded_headers_are_counted_but_never_remembered(make_client: AppFactory, store_url: str) -> None:
    # The sources of requests are remembered by peer and header; a header near gunicorn's size limits, which
    # anyone can send, must not become a cache entry of that size.
    client = make_client(store_url=store_url, ATTEST_RATE_LIMIT_PER_MINUTE="2", ATTEST_TRUSTED_PROXIES="10.0.0.0/8")
    sources.remembered_source.cache_clear()
    padding = ",".join(f"198.51.100.{index % 250}" for index in range(600))
    for _ in range(2):
        assert _from(client, "/v1/challenges", "10.0.0.5", forwarded=f"{padding},203.0.113.9") == 201
    # Still counted per client: the right-most untrusted hop is the source.
    assert _from(client, "/v1/challenges", "10.0.0.5", forwarded=f"{padding},203.0.113.9") == 429
    assert sources.remembered_source.cache_info().currsize == 0
    assert _from(client, "/v1/challenges", "10.0.0.5", forwarded="203.0.113.10") == 201
    assert sources.remembered_source.cache_info().currsize == 1


def test_rotating_ipv6_addresses_share_their_slash_64_budget(make_client: AppFactory, store_url: str) -> None:
    client = make_client(store_url=store_url, ATTEST_RATE_LIMIT_PER_MINUTE="2")
    assert _from(client, "/v1/challenges", "2001:db8:1:2::1") == 201
    assert _from(client, "/v1/challenges", "2001:db8:1:2::2") == 201
    assert _from(client, "/v1/challenges", "2001:db8:1:2:dead:beef:0:3") == 429
    assert _from(client, "/v1/challenges", "2001:db8:1:3::1") == 201


def test_failed_authentication_is_throttled_per_source(make_client: AppFactory, store_url: str) -> None:
    clock = Clock()
    client = make_client(store_url=store_url, clock=clock, ATTEST_API_KEYS=API_KEYS_ENV,
                         ATTEST_AUTH_FAILURES_PER_MINUTE="3")
    wrong = {"Authorization": "Bearer guess"}
    for _ in range(3):
        assert _from(client, "/v1/challenges", "192.0.2.10", headers=wrong) == 401
    response = client.post("/v1/challenges", headers=wrong, environ_base={"REMOTE_ADDR": "192.0.2.10"})
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "rate_limited"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 120
    # While blocked, every request from the source is answered 429 before its key is looked at: a right key
    # as a wrong or missing one, so the answer tells a guesser nothing, on both routes and both paths.
    for headers in (wrong, {}, bearer("billing"), bearer("license-server")):
        blocked = client.post("/v1/challenges", headers=headers, environ_base={"REMOTE_ADDR": "192.0.2.10"})
        assert blocked.status_code == 429
        assert blocked.get_json()["error"]["code"] == "rate_limited"
        assert 1 <= int(blocked.headers["Retry-After"]) <= retry_after
        verify = client.post("/v1/verify", json={"signature": "AAAA"}, headers=headers,
                             environ_base={"REMOTE_ADDR": "192.0.2.10"})
        assert verify.status_code == 429
    # Other sources are not affected, and the block ends with its Retry-After.
    assert _from(client, "/v1/challenges", "192.0.2.11", headers=bearer("billing")) == 201
    clock.now = NOW + timedelta(seconds=retry_after)
    assert _from(client, "/v1/challenges", "192.0.2.10", headers=bearer("billing")) == 201


def test_anonymous_challenges_are_bounded_per_source(make_client: AppFactory, store_url: str) -> None:
    client = make_client(store_url=store_url, ATTEST_ANONYMOUS_CHALLENGES="2")
    for _ in range(2):
        assert _from(client, "/v1/challenges", "192.0.2.20") == 201
    response = client.post("/v1/challenges", environ_base={"REMOTE_ADDR": "192.0.2.20"})
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert _from(client, "/v1/challenges", "192.0.2.21") == 201


def test_keyed_clients_are_not_held_to_the_anonymous_challenge_bound(make_client: AppFactory) -> None:
    client = make_client(ATTEST_API_KEYS=API_KEYS_ENV, ATTEST_ANONYMOUS_CHALLENGES="2")
    for _ in range(5):
        assert _from(client, "/v1/challenges", "192.0.2.30", headers=bearer("billing")) == 201


def test_what_an_anonymous_caller_leaves_in_redis_expires(make_client: AppFactory, redis: RedisServer) -> None:
    if not redis.running:
        redis.start()
    store = redis.client()
    store.flushall()
    client = make_client(store_url=redis.url, ATTEST_API_KEYS=API_KEYS_ENV)
    assert _from(client, "/v1/challenges", "192.0.2.40", headers={"Authorization": "Bearer guess"}) == 401
    anonymous = make_client(store_url=redis.url)
    assert _from(anonymous, "/v1/challenges", "2001:db8:9::1") == 201
    keys = store.keys("*")
    assert len(keys) >= 3  # the failure count, the anonymous budget, the challenge bound (and the challenge)
    # Rate windows and challenges alike carry an expiry, within the hour after the app's instant (the stores
    # expire at absolute instants of the app's clock, which runs in 2030 here): nothing lives for ever.
    now_ms = time.time() * 1000
    horizon_ms = (NOW + timedelta(hours=1)).timestamp() * 1000
    expiries = {key: store.pttl(key) for key in keys}
    assert all(ttl > 0 and now_ms + ttl <= horizon_ms for ttl in expiries.values()), expiries
    store.close()


def test_the_block_table_is_bounded() -> None:
    blocks = FailedAuthBlocks(capacity=16)
    for index in range(200):
        blocks.block(f"192.0.2.{index}", NOW + timedelta(milliseconds=index), 60)
    # A flood of sources takes the places of the blocks ending soonest; the table never grows.
    assert blocks.blocked_count(NOW) == 16
    with pytest.raises(RateLimited, match="too many failed authentications"):
        blocks.check("192.0.2.199", NOW)
    blocks.check("192.0.2.199", NOW + timedelta(seconds=61))  # the block has ended


@pytest.mark.slow
def test_a_block_is_seen_by_every_process_forked_after_the_table_was_made() -> None:
    blocks = FailedAuthBlocks()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child blocks a source, as a worker does, and exits
        blocks.block("198.51.100.9", NOW, 30)
        os.write(writer, b"x")
        os._exit(0)
    os.read(reader, 1)
    os.waitpid(child, 0)
    with pytest.raises(RateLimited) as blocked:
        blocks.check("198.51.100.9", NOW + timedelta(seconds=10))
    assert blocked.value.retry_after == 20
    blocks.check("198.51.100.8", NOW)


@pytest.mark.parametrize(("value", "fragment"), [
    ("0", "outside"), ("0.1", "outside"), ("121", "outside"), ("ten", "not a number"), ("nan", "outside"),
])
def test_the_body_timeout_is_validated_at_start(value: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=f"ATTEST_BODY_TIMEOUT_SECONDS: .*{fragment}"):
        Settings.from_env({"ATTEST_BODY_TIMEOUT_SECONDS": value})


def test_the_body_timeout_defaults_to_ten_seconds() -> None:
    assert Settings.from_env({}).body_timeout_seconds == 10
    assert Settings.from_env({"ATTEST_BODY_TIMEOUT_SECONDS": "2.5"}).body_timeout_seconds == 2.5
