"""End to end under real gunicorn workers: exactly-once acceptance, store outages, metrics, access log.

The service runs with the system clock, so the documents come from a PKI generated around the real time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import tools
from tests.support.redis_server import RedisServer, redis_server
from tests.web.conftest import GeneratedPki
from tests.web.live import LiveService, live_service

pytestmark = pytest.mark.slow

#: Simultaneous submissions of one document.
RACERS = 32




@pytest.fixture(scope="module")
def redis_for_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    tools.require("redis-server", "redis-cli")
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def fresh(live_pki: GeneratedPki, nonce: str) -> dict[str, object]:
    return {"signature": live_pki.signature(nonce=nonce, created_on=datetime.now(UTC) - timedelta(seconds=5))}


def race(service: LiveService, body: dict[str, object]) -> Counter[int]:
    barrier = threading.Barrier(RACERS)
    statuses: list[int] = []
    lock = threading.Lock()

    def submit() -> None:
        barrier.wait()
        status, _, _ = service.request("POST", "/v1/verify", body)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=submit) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return Counter(statuses)


def metric_value(text: str, line_prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_one_document_is_accepted_exactly_once(backend: str, live_pki: GeneratedPki, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    if backend == "redis":
        store = request.getfixturevalue("redis_for_live").url
    else:
        store = f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
    env = {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir), "ATTEST_NONCE_STORE": store}
    with live_service(env, tmp_path, workers=4) as service:
        outcome = race(service, fresh(live_pki, f"race-{backend}-{datetime.now(UTC):%H%M%S%f}"))
        assert outcome == Counter({200: 1, 409: RACERS - 1})

        # Every worker's counts are summed by /metrics (prometheus-client multiprocess mode).
        status, _, text = service.request("GET", "/metrics")
        assert status == 200
        metrics = text.decode()
        assert metric_value(metrics, 'attest_verifications_total{code="none",result="verified"}') == 1
        assert metric_value(metrics, 'attest_verifications_total{code="nonce_replayed",result="refused"}') == 31
        # The default registry's collectors (pinned-certificate expiry) are exposed alongside.
        assert "attest_pinned_certificate_not_after_seconds{" in metrics

    # The access log is JSON lines carrying the request id the service echoed.
    lines = [json.loads(line) for line in service.log.read_text().splitlines() if line.startswith("{")]
    verify_lines = [line for line in lines if line["logger"] == "gunicorn.access" and line["path"] == "/v1/verify"]
    assert len(verify_lines) == RACERS
    assert all(len(line["request_id"]) == 32 for line in verify_lines)


def test_redis_outage_fails_closed_and_recovers(live_pki: GeneratedPki, redis_for_live: RedisServer,
                                                tmp_path: Path) -> None:
    env = {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir), "ATTEST_NONCE_STORE": redis_for_live.url,
           "ATTEST_STORE_TIMEOUT_SECONDS": "0.2"}
    with live_service(env, tmp_path, workers=2) as service:
        assert service.json("POST", "/v1/verify", fresh(live_pki, "before-outage"))[0] == 200
        during = fresh(live_pki, "during-outage")
        redis_for_live.stop()
        try:
            for _ in range(4):  # reach both workers
                status, body = service.json("POST", "/v1/verify", during)
                assert (status, body["error"]["code"]) == (503, "store_unavailable")  # type: ignore[index]
            assert service.request("GET", "/readyz")[0] == 503
            assert service.request("GET", "/healthz")[0] == 200
        finally:
            redis_for_live.start()
        assert service.request("GET", "/readyz")[0] == 200
        # Nothing was accepted during the outage: the same document is accepted now, once.
        assert service.json("POST", "/v1/verify", during)[0] == 200
        assert service.json("POST", "/v1/verify", during)[0] == 409
        with_challenge = service.json("POST", "/v1/challenges")
        assert with_challenge[0] == 201


@pytest.mark.parametrize(("variable", "value", "fragment"), [
    ("ATTEST_API_KEYS", "client:not-hex", "ATTEST_API_KEYS"),
    ("ATTEST_POLICY_FILE", "/nonexistent/policy.toml", "ATTEST_POLICY_FILE"),
    ("ATTEST_NONCE_STORE", "memcached://x", "ATTEST_NONCE_STORE"),
    ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/metrics", "PROMETHEUS_MULTIPROC_DIR"),
])
def test_serve_refuses_bad_settings_before_starting(variable: str, value: str, fragment: str) -> None:
    env = {**os.environ, variable: value}
    result = subprocess.run([sys.executable, "-m", "attest_service", "serve", "--bind", "127.0.0.1:1"],
                            env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
