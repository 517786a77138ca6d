"""The figures behind design choices in the code, each measured on its own (docs/DEPLOYMENT.md quotes them).

- the Redis store's client CPU per script: redis-py's ``execute_command`` against the store's own use of a
  held connection (``nonces.redis.connection.DirectConnections``);
- Redis's CPU per claim when claims arrive one, two or four at a time (the group commit);
- hashing the accept script's source, which the store does once instead of per claim;
- loading the bundled pinned directory against taking its fingerprint (the master's periodic check);
- where a request came from: parsing the addresses against the remembered answer;
- a full garbage collection in a process with the application built, before and after ``gc.freeze()``.

Needs redis-server (a private one is started on a free port). Prints figures; asserts nothing.

Run: ``python benchmarks/bench_internals.py [--calls N]``
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import secrets
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from attest_service.callers.sources import client_address, remembered_source, source_key  # noqa: E402
from attest_service.nonces.redis.connection import DirectConnections  # noqa: E402
from attest_service.nonces.redis.keys import challenge_key, seen_key  # noqa: E402
from attest_service.nonces.redis.scripts import ACCEPT_SCRIPT, MAX_LISTED_SCOPES  # noqa: E402
from attest_service.settings import Settings  # noqa: E402
from attest_service.trust.loading import bundled_pinned_dir, directory_fingerprint, load_trust  # noqa: E402
from tests.support.redis_server import redis_server  # noqa: E402


def per_call_us(function: Callable[[], object], calls: int) -> float:
    """Best of three runs of ``calls`` calls, in microseconds per call (wall clock)."""
    return min(timeit.repeat(function, number=calls, repeat=3)) / calls * 1e6


def _claim_args(nonce: str) -> tuple[list[str], list[str | int]]:
    keys = [challenge_key(nonce), seen_key(nonce), seen_key(nonce)]
    return keys, ["bench", "0", "60000", secrets.token_urlsafe(12), "", MAX_LISTED_SCOPES]


def client_cpu_per_script(calls: int) -> None:
    """This process's CPU per accept script, through redis-py's command path and through a held connection."""
    with redis_server() as server:
        client = server.client()
        direct = DirectConnections(client)
        for label, via in (("execute_command", None), ("held connection", direct)):
            claims = [_claim_args(f"client-{label}-{index}") for index in range(calls)]
            ACCEPT_SCRIPT.run(client, *claims[0], via)  # loads the script into the server
            started = time.process_time()
            for keys, args in claims[1:]:
                ACCEPT_SCRIPT.run(client, keys, args, via)
            used = time.process_time() - started
            print(f"client CPU per accept script, {label}: {used / (calls - 1) * 1e6:.1f} us")
        direct.close()


def redis_cpu_per_claim(calls: int) -> None:
    """Redis's CPU per claim (INFO cpu) when the claims reach it 1, 2 or 4 in one write."""
    with redis_server() as server:
        client = server.client()
        ACCEPT_SCRIPT.run(client, *_claim_args("warm-up"))
        for together in (1, 2, 4):
            groups = [[_claim_args(f"redis-{together}-{group}-{index}") for index in range(together)]
                      for group in range(calls // together)]
            before = client.info("cpu")
            for group in groups:
                pipe = client.pipeline(transaction=False)  # one write for the whole group
                for keys, args in group:
                    pipe.execute_command("EVALSHA", ACCEPT_SCRIPT.sha1, len(keys), *keys, *args)
                pipe.execute()
            after = client.info("cpu")
            used = sum(float(after[name]) - float(before[name]) for name in ("used_cpu_user", "used_cpu_sys"))
            print(f"Redis CPU per claim, {together} at a time: {used / (len(groups) * together) * 1e6:.1f} us")


def script_digest(calls: int) -> None:
    """SHA-1 of the accept script's source, as each claim would pay it without the stored digest."""
    source = ACCEPT_SCRIPT.source
    cost = per_call_us(lambda: hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest(), calls)
    print(f"SHA-1 of the accept script: {cost:.1f} us")


def trust_load_and_fingerprint() -> None:
    """Loading the bundled pinned directory, and its fingerprint (what the master compares first)."""
    directory = bundled_pinned_dir()
    load = per_call_us(lambda: load_trust(directory), 20) / 1000
    check = per_call_us(lambda: directory_fingerprint(directory), 20) / 1000
    print(f"bundled pinned directory: load {load:.1f} ms, fingerprint {check:.2f} ms")


def request_source(calls: int) -> None:
    """Where a request came from, parsed each time against remembered (one peer, one trusted proxy hop)."""
    proxies = Settings.from_env({"ATTEST_TRUSTED_PROXIES": "10.0.0.0/8"}).trusted_proxies
    forwarded = ("203.0.113.9",)
    parsed = per_call_us(lambda: source_key(client_address("10.0.0.5", forwarded, proxies)), calls)
    remembered = per_call_us(lambda: remembered_source("10.0.0.5", forwarded, proxies), calls)
    print(f"request source: parsed {parsed:.1f} us, remembered {remembered:.2f} us")


def collection_pause() -> None:
    """A full collection with the application built, before and after gc.freeze() (as a worker does)."""
    from attest_service.web import create_app  # noqa: PLC0415 - loads the web stack for this figure only

    with tempfile.TemporaryDirectory() as state:
        settings = Settings.from_env({"ATTEST_NONCE_STORE": f"sqlite:///{state}/nonces.sqlite3",
                                      "ATTEST_FINGERPRINT_FETCH": "0"})
        app = create_app(settings)
        before = per_call_us(gc.collect, 1) / 1000
        gc.freeze()
        after = per_call_us(gc.collect, 1) / 1000
        gc.unfreeze()
        print(f"full collection with the application built: {before:.1f} ms, after gc.freeze() {after:.2f} ms")
        del app


def main() -> None:
    """Print every figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per measurement (default 4000)")
    calls = parser.parse_args().calls
    client_cpu_per_script(calls)
    redis_cpu_per_claim(calls)
    script_digest(calls)
    trust_load_and_fingerprint()
    request_source(calls)
    collection_pause()


if __name__ == "__main__":
    main()
