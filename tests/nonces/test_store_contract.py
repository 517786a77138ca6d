"""The rules every nonce store keeps, run against SQLite, standalone Redis and a Redis cluster."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from attest_service.errors import NonceReplayed, NonceUnknown, RateLimited, StoreUnavailable
from attest_service.nonces import CACHED_DOCUMENT_HINT, Acceptance, NonceStore
from attest_service.nonces.store import CLOCK_DISAGREEMENT_MARGIN_SECONDS

from .conftest import StoreFactory, utcnow

Unique = Callable[[str], str]
#: Lifetime of a document in these tests: comfortably longer than any test.
DOCUMENT_LIFETIME = timedelta(minutes=10)


def accept(store: NonceStore, nonce: str, client_id: str, *, require_challenge: bool = False) -> Acceptance:
    now = utcnow()
    return store.accept(
        nonce, client_id=client_id, expires_at=now + DOCUMENT_LIFETIME, require_challenge=require_challenge, now=now
    )


def issue(store: NonceStore, nonce: str, client_id: str, lifetime: timedelta = timedelta(minutes=5)) -> None:
    store.issue_challenge(nonce, client_id=client_id, expires_at=utcnow() + lifetime)


def test_ping(store: NonceStore) -> None:
    store.ping()


def test_caller_chosen_nonce_is_accepted_once(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    assert accept(store, nonce, client) == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed) as replay:
        accept(store, nonce, client)
    assert CACHED_DOCUMENT_HINT not in replay.value.message
    # Another client presenting the same nonce is refused as well, and not told who used it.
    with pytest.raises(NonceReplayed) as other:
        accept(store, nonce, unique("other"))
    assert unique("client") not in other.value.message


def test_challenge_is_consumed_once(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    issue(store, nonce, client)
    assert accept(store, nonce, client, require_challenge=True) == Acceptance(challenge=True)
    with pytest.raises(NonceReplayed) as replay:
        accept(store, nonce, client, require_challenge=True)
    assert CACHED_DOCUMENT_HINT in replay.value.message
    with pytest.raises(NonceReplayed):
        accept(store, nonce, client, require_challenge=False)


def test_live_challenge_is_consumed_even_when_not_required(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    issue(store, nonce, client)
    assert accept(store, nonce, client, require_challenge=False) == Acceptance(challenge=True)


def test_required_challenge_that_was_never_issued_is_unknown(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    with pytest.raises(NonceUnknown):
        accept(store, nonce, client, require_challenge=True)
    # The refusal recorded nothing: the nonce is still fresh.
    assert accept(store, nonce, client) == Acceptance(challenge=False)


@pytest.mark.parametrize("require_challenge", [True, False])
def test_challenge_of_another_client_is_unknown(store: NonceStore, unique: Unique, require_challenge: bool) -> None:
    nonce, owner, intruder = unique("nonce"), unique("owner"), unique("intruder")
    issue(store, nonce, owner)
    with pytest.raises(NonceUnknown):
        accept(store, nonce, intruder, require_challenge=require_challenge)
    # The intruder's attempt neither consumed nor burnt the owner's challenge.
    assert accept(store, nonce, owner, require_challenge=True) == Acceptance(challenge=True)


def test_challenge_cannot_be_issued_twice(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    issue(store, nonce, client)
    with pytest.raises(NonceReplayed):
        issue(store, nonce, unique("other"))


@pytest.mark.slow
def test_expired_challenge_is_unknown(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    issue(store, nonce, client, lifetime=timedelta(milliseconds=300))
    time.sleep(0.4)  # Redis expires the key on its own clock; SQLite compares with the `now` passed in.
    with pytest.raises(NonceUnknown):
        accept(store, nonce, client, require_challenge=True)


@pytest.mark.slow
def test_seen_record_lives_until_the_document_expires(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store(challenge_ttl_seconds=0.2)
    nonce, client = unique("nonce"), unique("client")
    now = utcnow()
    store.accept(nonce, client_id=client, expires_at=now + timedelta(seconds=1), require_challenge=False, now=now)
    time.sleep(0.3)  # past the minimum retention, not past the document's expiry
    later = utcnow()
    with pytest.raises(NonceReplayed):
        store.accept(nonce, client_id=client, expires_at=now + timedelta(seconds=1), require_challenge=False, now=later)


def test_seen_record_lives_at_least_one_challenge_lifetime(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store(challenge_ttl_seconds=1.0)
    nonce, client = unique("nonce"), unique("client")
    now = utcnow()
    # The document already expired (the caller refuses such documents, but the store must not rely on it).
    expired = now - timedelta(seconds=30)
    store.accept(nonce, client_id=client, expires_at=expired, require_challenge=False, now=now)
    with pytest.raises(NonceReplayed):
        store.accept(nonce, client_id=client, expires_at=expired, require_challenge=False, now=utcnow())


@pytest.mark.slow
def test_consumed_challenge_is_remembered_until_it_would_have_expired(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store(challenge_ttl_seconds=0.2)
    nonce, client = unique("nonce"), unique("client")
    issue(store, nonce, client, lifetime=timedelta(seconds=30))
    now = utcnow()
    store.accept(nonce, client_id=client, expires_at=now + timedelta(milliseconds=200), require_challenge=True, now=now)
    time.sleep(0.4)  # the document and the minimum retention are over; the challenge's lifetime is not
    later = utcnow()
    with pytest.raises(NonceReplayed):
        store.accept(nonce, client_id=client, expires_at=later + DOCUMENT_LIFETIME, require_challenge=False, now=later)


@pytest.mark.slow
def test_seen_record_is_forgotten_after_it_expires(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store(challenge_ttl_seconds=0.2)
    nonce, client = unique("nonce"), unique("client")
    now = utcnow()
    # Records are kept for the clock-disagreement margin past the document's expiry: a document that expired
    # that long ago (less 200 ms) leaves a record that lives 200 ms.
    expired = now - timedelta(seconds=CLOCK_DISAGREEMENT_MARGIN_SECONDS) + timedelta(milliseconds=200)
    store.accept(nonce, client_id=client, expires_at=expired, require_challenge=False, now=now)
    time.sleep(0.4)
    later = utcnow()
    assert store.accept(
        nonce, client_id=client, expires_at=later + DOCUMENT_LIFETIME, require_challenge=False, now=later
    ) == Acceptance(challenge=False)


def test_rate_limit(store: NonceStore, unique: Unique) -> None:
    client, other = unique("client"), unique("other")
    now = utcnow()
    for _ in range(5):
        store.hit_rate(client, limit=5, window_seconds=60, now=now)
    with pytest.raises(RateLimited) as refused:
        store.hit_rate(client, limit=5, window_seconds=60, now=now)
    assert 1 <= refused.value.retry_after <= 120
    # Clients are counted apart.
    store.hit_rate(other, limit=5, window_seconds=60, now=now)
    # Two windows later, nothing of the burst is left.
    for _ in range(5):
        store.hit_rate(client, limit=5, window_seconds=60, now=now + timedelta(seconds=120))


def test_rate_count_grants_what_fits_and_no_more(store: NonceStore, unique: Unique) -> None:
    client, now = unique("client"), utcnow()
    assert store.hit_rate(client, limit=10, window_seconds=60, now=now, count=4) == 4
    assert store.hit_rate(client, limit=10, window_seconds=60, now=now) == 1
    # Five fit of the eight asked for; then none.
    assert store.hit_rate(client, limit=10, window_seconds=60, now=now, count=8) == 5
    with pytest.raises(RateLimited):
        store.hit_rate(client, limit=10, window_seconds=60, now=now, count=3)
    with pytest.raises(ValueError, match="count"):
        store.hit_rate(client, limit=10, window_seconds=60, now=now, count=0)


def test_rate_count_is_weighed_like_single_requests(make_store: StoreFactory, unique: Unique) -> None:
    # Half-way through the next window, half of the previous window's 10 still weigh: 5 more fit, counted
    # in one go or one by one alike.
    batch, single = make_store(), make_store()
    first, second, now = unique("first"), unique("second"), utcnow()
    start = now - timedelta(milliseconds=(int(now.timestamp() * 1000) % 60_000))
    middle = start + timedelta(seconds=90)
    for store, client in ((batch, first), (single, second)):
        assert store.hit_rate(client, limit=10, window_seconds=60, now=start, count=10) == 10
    assert batch.hit_rate(first, limit=10, window_seconds=60, now=middle, count=50) == 5
    assert sum(single.hit_rate(second, limit=10, window_seconds=60, now=middle) for _ in range(5)) == 5
    for store, client in ((batch, first), (single, second)):
        with pytest.raises(RateLimited):
            store.hit_rate(client, limit=10, window_seconds=60, now=middle)


def test_rate_limit_is_shared_by_stores_on_one_backend(make_store: StoreFactory, unique: Unique) -> None:
    first, second = make_store(), make_store()
    client, now = unique("client"), utcnow()
    first.hit_rate(client, limit=2, window_seconds=60, now=now)
    second.hit_rate(client, limit=2, window_seconds=60, now=now)
    with pytest.raises(RateLimited):
        first.hit_rate(client, limit=2, window_seconds=60, now=now)


def test_replay_is_refused_by_another_store_on_one_backend(make_store: StoreFactory, unique: Unique) -> None:
    nonce, client = unique("nonce"), unique("client")
    first, second = make_store(), make_store()
    issue(first, nonce, client)
    assert accept(second, nonce, client, require_challenge=True) == Acceptance(challenge=True)
    with pytest.raises(NonceReplayed):
        accept(first, nonce, client)


def test_closed_store_refuses(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store()
    store.ping()
    store.close()
    with pytest.raises(StoreUnavailable):
        accept(store, unique("nonce"), unique("client"))


def test_naive_datetimes_are_refused(store: NonceStore, unique: Unique) -> None:
    naive = utcnow().replace(tzinfo=None)
    with pytest.raises(ValueError, match="naive"):
        store.accept(unique("nonce"), client_id=unique("c"), expires_at=naive, require_challenge=False, now=naive)


def test_awkward_nonces_are_kept_apart(store: NonceStore, unique: Unique) -> None:
    # Braces would move a Redis hash tag if nonces were used in keys as they are.
    client = unique("client")
    for nonce in ("{a}", "{a}}", "a|b", "é", " ", "x" * 1000):
        assert accept(store, unique(nonce), client) == Acceptance(challenge=False)


@pytest.mark.slow
def test_a_caller_clock_behind_the_store_cannot_reopen_a_replay(store: NonceStore, unique: Unique) -> None:
    # A replica whose clock runs two days behind the store's: the document's expiry, by that clock, is already
    # far in the store's past. The seen record must still outlive the replica's acceptance window.
    nonce = unique("behind")
    behind = utcnow() - timedelta(days=2)
    first = store.accept(nonce, client_id="c1", expires_at=behind + timedelta(hours=6), require_challenge=False,
                         now=behind)
    assert first == Acceptance(challenge=False)
    time.sleep(0.05)  # a record written with an already-past expiry would be gone by now
    with pytest.raises(NonceReplayed):
        store.accept(nonce, client_id="c1", expires_at=behind + timedelta(hours=6), require_challenge=False,
                     now=behind)
