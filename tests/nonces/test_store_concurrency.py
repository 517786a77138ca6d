"""Many contenders, one nonce: exactly one acceptance, on every backend, across threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.synchronize import Barrier as ProcessBarrier

import pytest

from attest_service.errors import AttestError
from attest_service.nonces import NonceStore

from .conftest import StoreFactory, utcnow

pytestmark = pytest.mark.slow

THREADS = 32
PROCESSES = 8
THREADS_PER_PROCESS = 4
#: Generous store timeout: under this much contention a SQLite writer may queue behind thirty others.
CONTENTION_TIMEOUT_SECONDS = 5.0
#: How long a contender waits for the others at the start line (seconds).
BARRIER_TIMEOUT_SECONDS = 20.0


def attempt(store: NonceStore, nonce: str, *, require_challenge: bool, wait: Callable[[], object]) -> str:
    """One contender: ``"challenge"``/``"seen"`` when accepted, else the error code."""
    wait()
    now = utcnow()
    try:
        acceptance = store.accept(
            nonce,
            client_id="client",
            expires_at=now + timedelta(minutes=5),
            require_challenge=require_challenge,
            now=now,
        )
    except AttestError as exc:
        return exc.code
    return "challenge" if acceptance.challenge else "seen"


def threaded_attempts(store: NonceStore, nonce: str, *, threads: int, require_challenge: bool) -> Counter[str]:
    start = threading.Barrier(threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [
            pool.submit(attempt, store, nonce, require_challenge=require_challenge, wait=start.wait)
            for _ in range(threads)
        ]
        return Counter(future.result() for future in futures)


@pytest.mark.parametrize("require_challenge", [False, True])
def test_threads_race_for_one_nonce(
    make_store: StoreFactory, unique: Callable[[str], str], require_challenge: bool
) -> None:
    store = make_store(timeout_seconds=CONTENTION_TIMEOUT_SECONDS)
    nonce = unique("nonce")
    if require_challenge:
        store.issue_challenge(nonce, client_id="client", expires_at=utcnow() + timedelta(minutes=5))
    outcomes = threaded_attempts(store, nonce, threads=THREADS, require_challenge=require_challenge)
    winner = "challenge" if require_challenge else "seen"
    assert outcomes == Counter({winner: 1, "nonce_replayed": THREADS - 1})


def _process_contender(
    store: NonceStore, nonce: str, start: ProcessBarrier, results: multiprocessing.SimpleQueue[list[str]]
) -> None:
    # The store object was created (and used) by the parent: each child must open its own connection.
    outcomes = threaded_attempts_with_barrier(store, nonce, start)
    results.put(outcomes)


def threaded_attempts_with_barrier(store: NonceStore, nonce: str, start: ProcessBarrier) -> list[str]:
    with ThreadPoolExecutor(max_workers=THREADS_PER_PROCESS) as pool:
        futures = [
            pool.submit(attempt, store, nonce, require_challenge=True, wait=lambda: start.wait(BARRIER_TIMEOUT_SECONDS))
            for _ in range(THREADS_PER_PROCESS)
        ]
        return [future.result() for future in futures]


def test_processes_race_for_one_challenge(make_store: StoreFactory, unique: Callable[[str], str]) -> None:
    store = make_store(timeout_seconds=CONTENTION_TIMEOUT_SECONDS)
    nonce = unique("nonce")
    store.issue_challenge(nonce, client_id="client", expires_at=utcnow() + timedelta(minutes=5))
    store.ping()  # the parent holds an open connection when it forks, as a gunicorn master could
    # fork, as gunicorn does: the children inherit the parent's store and its connection.
    context = multiprocessing.get_context("fork")
    start = context.Barrier(PROCESSES * THREADS_PER_PROCESS)
    results: multiprocessing.SimpleQueue[list[str]] = context.SimpleQueue()
    children = [
        context.Process(target=_process_contender, args=(store, nonce, start, results)) for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert all(child.exitcode == 0 for child in children), [child.exitcode for child in children]
    outcomes: Counter[str] = Counter()
    for _ in children:
        outcomes.update(results.get())
    assert outcomes == Counter({"challenge": 1, "nonce_replayed": PROCESSES * THREADS_PER_PROCESS - 1})
    # The parent's own connection still works after its children used theirs.
    store.ping()
