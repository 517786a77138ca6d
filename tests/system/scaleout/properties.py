"""What must hold when several service instances share one nonce store, checked over HTTP.

Each check takes two running instances (separate gunicorn masters) and spreads its requests over both, so
that an instance-local record (a worker's memory, a per-process counter) would show up as a second acceptance
or a missing refusal. The same checks run on one Redis server and on a Redis Cluster.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tests.support.service import DocumentFactory, Reply, ServiceProcess, api_keys_env

#: Simultaneous submissions of one document, spread over both instances.
RACERS: Final = 32
#: Requests per minute a client may make when a check wants the limit out of the way.
GENEROUS_RATE_LIMIT: Final = 1_000_000
#: A limit small enough to reach in a moment, for the shared rate-limit check.
SMALL_RATE_LIMIT: Final = 20
#: Seconds before the end of a rate window within which the rate check waits for the next window: the
#: sliding window lets the previous window's count decay after the boundary, which would blur the count.
RATE_WINDOW_MARGIN_SECONDS: Final = 5.0
RATE_WINDOW_SECONDS: Final = 60

#: API keys by client id. Each check uses its own client, so the rate limit of one never touches another.
KEYS: Final = {
    "replay": "replay-key-0001",
    "challenger": "challenger-key-0002",
    "race": "race-key-0003",
    "metered": "metered-key-0004",
    "failover": "failover-key-0005",
    "bystander": "bystander-key-0006",
}
#: A second VM, for the per-VM claim of caller-chosen nonces (the factory signs for its own VM otherwise).
OTHER_VM_ID: Final = "5d1e0a7c-0000-4000-8000-00000000a002"
#: The challenger must present a service-issued challenge: a nonce the store does not know is refused, so a
#: 200 proves that the other instance found the challenge this one issued.
POLICY: Final = """
[clients.challenger]
require_challenge = true
"""


@dataclass(frozen=True, slots=True)
class Pair:
    """Two instances of the service on one nonce store."""

    first: ServiceProcess
    second: ServiceProcess

    def __iter__(self) -> Iterator[ServiceProcess]:
        return iter((self.first, self.second))

    def at(self, index: int) -> ServiceProcess:
        """Instance ``index`` modulo two: alternate between them by counting."""
        return self.second if index % 2 else self.first


def service_env(store_url: str, pinned_dir: Path, workdir: Path, *, rate_limit_per_minute: int) -> dict[str, str]:
    """The environment of both instances: pinned trust, the shared store, the clients, the policy."""
    policy = workdir / "policy.toml"
    policy.write_text(POLICY)
    return {
        "ATTEST_PINNED_CERTS": str(pinned_dir),
        "ATTEST_NONCE_STORE": store_url,
        "ATTEST_API_KEYS": api_keys_env(KEYS),
        "ATTEST_POLICY_FILE": str(policy),
        "ATTEST_RATE_LIMIT_PER_MINUTE": str(rate_limit_per_minute),
        "ATTEST_LOG_LEVEL": "warning",
    }


def unique_nonce(prefix: str) -> str:
    """A caller-chosen nonce nobody used before (IMDS allows 32 characters)."""
    return f"{prefix}-{uuid.uuid4().hex}"[:32]


def verify(instance: ServiceProcess, factory: DocumentFactory, nonce: str, client: str) -> Reply:
    """Post a fresh document signed over ``nonce`` to ``instance`` as ``client``."""
    return instance.post("/v1/verify", factory.verify_body(nonce), key=KEYS[client])


def check_replay_refused_across(pair: Pair, factory: DocumentFactory) -> None:
    """A nonce accepted by one instance is refused (409 nonce_replayed) by the other, in both directions."""
    for accepting, other in ((pair.first, pair.second), (pair.second, pair.first)):
        nonce = unique_nonce("replay")
        body = factory.verify_body(nonce)
        accepted = accepting.post("/v1/verify", body, key=KEYS["replay"])
        assert accepted.status == 200, accepted
        # The same document, and a different document signed over the same nonce, are both replays.
        for attempt in (body, factory.verify_body(nonce)):
            refused = other.post("/v1/verify", attempt, key=KEYS["replay"])
            assert (refused.status, refused.code) == (409, "nonce_replayed"), refused
        again = accepting.post("/v1/verify", body, key=KEYS["replay"])
        assert (again.status, again.code) == (409, "nonce_replayed"), again
        # Another VM's document over the same nonce is its own first use (nonces are claimed per VM), once.
        other_vm = factory.verify_body(nonce, vm_id=OTHER_VM_ID)
        assert other.post("/v1/verify", other_vm, key=KEYS["replay"]).status == 200
        refused = accepting.post("/v1/verify", other_vm, key=KEYS["replay"])
        assert (refused.status, refused.code) == (409, "nonce_replayed"), refused


def check_challenge_crosses_instances(pair: Pair, factory: DocumentFactory) -> None:
    """A challenge issued by one instance is consumed at the other, once across both; racers get one 200."""
    # The challenger needs a live challenge: a nonce nobody issued is refused, on either instance.
    unknown = verify(pair.first, factory, unique_nonce("never-issued"), "challenger")
    assert (unknown.status, unknown.code) == (422, "nonce_unknown"), unknown

    issued = pair.first.post("/v1/challenges", key=KEYS["challenger"])
    assert issued.status == 201, issued
    nonce = str(issued.body["nonce"])
    body = factory.verify_body(nonce)
    consumed = pair.second.post("/v1/verify", body, key=KEYS["challenger"])
    assert consumed.status == 200, consumed
    assert consumed.body["nonce"] == {"value": nonce, "checked": True, "challenge": True}
    for instance in pair:
        refused = instance.post("/v1/verify", body, key=KEYS["challenger"])
        assert (refused.status, refused.code) == (409, "nonce_replayed"), refused

    # A challenge raced at both instances at once is consumed exactly once.
    issued = pair.second.post("/v1/challenges", key=KEYS["challenger"])
    assert issued.status == 201, issued
    outcome = race(pair, factory.verify_body(str(issued.body["nonce"])), client="challenger", racers=8)
    assert outcome == Counter({(200, None): 1, (409, "nonce_replayed"): 7}), outcome


def race(pair: Pair, body: dict[str, object], *, client: str, racers: int = RACERS) -> Counter[tuple[int, str | None]]:
    """Post ``body`` from ``racers`` threads released together, alternating instances; count (status, code)."""
    barrier = threading.Barrier(racers)
    replies: list[Reply] = []
    lock = threading.Lock()

    def submit(index: int) -> None:
        barrier.wait()
        reply = pair.at(index).post("/v1/verify", body, key=KEYS[client])
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(replies) == racers, "a racing request did not finish"
    return Counter((reply.status, reply.code) for reply in replies)


def check_one_of_racing_posts_accepted(pair: Pair, factory: DocumentFactory) -> None:
    """32 simultaneous posts of one document, half to each instance: exactly one 200, the rest replays."""
    outcome = race(pair, factory.verify_body(unique_nonce("race")), client="race")
    assert outcome == Counter({(200, None): 1, (409, "nonce_replayed"): RACERS - 1}), outcome


def _wait_for_room_in_window() -> None:
    into_window = time.time() % RATE_WINDOW_SECONDS
    if into_window > RATE_WINDOW_SECONDS - RATE_WINDOW_MARGIN_SECONDS:
        time.sleep(RATE_WINDOW_SECONDS - into_window + 0.1)


def check_rate_limit_shared(pair: Pair, limit: int) -> None:
    """``limit`` requests spread over both instances pass; the next one is refused by either (429).

    Each instance sees only half of the requests, so a per-instance count would let twice as many through.
    """
    _wait_for_room_in_window()
    statuses = [pair.at(index).post("/v1/challenges", key=KEYS["metered"]).status for index in range(limit)]
    assert statuses == [201] * limit
    for instance in pair:
        refused = instance.post("/v1/challenges", key=KEYS["metered"])
        assert (refused.status, refused.code) == (429, "rate_limited"), refused
    # Other clients keep their own budget (one that no other check uses: a client the other checks served
    # under a budget of leases may have the unused part of a lease counted in this window).
    assert pair.first.post("/v1/challenges", key=KEYS["bystander"]).status == 201
