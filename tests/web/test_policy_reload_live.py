"""Every worker of a real gunicorn serves a changed policy file, within the reload interval.

The policy was read once per worker: after an edit, the workers that were running kept the old policy and
respawned ones took the new one. Here two workers answer keyless challenge requests 401 under a policy
without an ``[anonymous]`` section; the file is replaced (as a ConfigMap volume update does) by one that
admits keyless callers, and then every worker answers 201, which the access log's ``pid`` shows. Then a
broken file keeps that policy in every worker and raises ``attest_policy_reload_failing``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.web.conftest import API_KEYS_ENV, GeneratedPki
from tests.web.live import LiveService, live_service

pytestmark = pytest.mark.slow

#: The reload interval of the service under test, in seconds (ATTEST_TRUST_RELOAD_SECONDS).
RELOAD_SECONDS = 1
#: Seconds to wait for every worker to take a change.
WAIT_SECONDS = 20.0
#: Requests sent at most to see every worker answer (the kernel spreads new connections between them).
MAX_REQUESTS = 400
KEYED_ONLY = '[clients.license-server]\nclouds = ["public"]\n'
WITH_ANONYMOUS = KEYED_ONLY + '[anonymous]\nrequire_challenge = true\n'


def _replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _answers_by_worker(service: LiveService, workers: list[int]) -> dict[int, set[int]]:
    """Keyless POST /v1/challenges on new connections until every worker answered one: statuses by worker pid."""
    offset = service.log.stat().st_size
    answers: dict[int, set[int]] = {}
    for _ in range(MAX_REQUESTS):
        service.request("POST", "/v1/challenges", {})
        with service.log.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        answers = {}
        for line in lines:
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("path") == "/v1/challenges":
                answers.setdefault(record["pid"], set()).add(record["status"])
        if set(answers) >= set(workers):
            return answers
    raise AssertionError(f"{MAX_REQUESTS} requests did not reach every worker: {answers}")


def _eventually_every_worker_answers(service: LiveService, workers: list[int], status: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        answers = _answers_by_worker(service, workers)
        if all(answers[pid] == {status} for pid in workers):
            return
        assert time.monotonic() < deadline, f"not every worker answers {status}: {answers}"
        time.sleep(RELOAD_SECONDS / 2)


def _metric(service: LiveService, sample: str) -> float:
    _, _, body = service.request("GET", "/metrics")
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def test_every_worker_serves_a_changed_policy_file(live_pki: GeneratedPki, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(KEYED_ONLY, encoding="utf-8")
    env = {"ATTEST_PINNED_CERTS": str(live_pki.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{tmp_path / 'n.db'}",
           "ATTEST_TRUST_RELOAD_SECONDS": str(RELOAD_SECONDS), "ATTEST_API_KEYS": API_KEYS_ENV,
           "ATTEST_POLICY_FILE": str(policy),
           # The 401s below are this test's, not a guessing attack: the source must not be blocked (429).
           "ATTEST_AUTH_FAILURES_PER_MINUTE": "10000"}
    with live_service(env, tmp_path, workers=2) as service:
        workers = service.worker_pids()
        assert len(workers) == 2
        assert all(statuses == {401} for statuses in _answers_by_worker(service, workers).values())
        _replace(policy, WITH_ANONYMOUS)
        _eventually_every_worker_answers(service, workers, 201)
        # A broken edit keeps the policy in force in every worker, and says so.
        _replace(policy, "[anonymous\nnot TOML")
        deadline = time.monotonic() + WAIT_SECONDS
        while _metric(service, "attest_policy_reload_failing") != 1:
            assert time.monotonic() < deadline, "attest_policy_reload_failing never rose"
            service.request("POST", "/v1/challenges", {})  # a worker checks its file on a request
            time.sleep(RELOAD_SECONDS / 2)
        time.sleep(2 * RELOAD_SECONDS)
        assert all(statuses == {201} for statuses in _answers_by_worker(service, workers).values())
        # Every worker has checked the broken file by now, and each still serves the policy in force.
        time.sleep(2 * RELOAD_SECONDS)
        assert all(statuses == {201} for statuses in _answers_by_worker(service, workers).values())
        assert service.worker_pids() == workers
    assert "policy file is unusable" in service.log.read_text()
