"""The access policy is reloaded when its file changes, as the pinned trust is; a broken file keeps the last good.

In-process, on a clock moved by hand; ``tests/web/test_policy_reload_live.py`` shows every worker of a real
gunicorn taking the change.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from attest_service.callers.policy import AccessPolicy, load_policy
from attest_service.callers.reloading import ReloadingPolicy
from attest_service.errors import ConfigurationError

CLIENTS = frozenset({"license-server"})
NARROW = '[clients.license-server]\nclouds = ["public"]\n'
WIDE = '[clients.license-server]\nclouds = ["public", "usgov"]\n'
WITH_ANONYMOUS = NARROW + '[anonymous]\nrequire_challenge = true\n'


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy(path: Path, clock: FakeClock, fallback: AccessPolicy | None = None) -> ReloadingPolicy:
    return ReloadingPolicy(lambda: load_policy(path, api_clients=CLIENTS), path, interval_seconds=10, clock=clock,
                           fallback=fallback)


def _clouds(policy: AccessPolicy) -> frozenset[str] | None:
    return policy.for_client("license-server").clouds


def _replace(path: Path, text: str) -> None:
    # As a ConfigMap volume or an editor saves: a new file renamed over the old one.
    temporary = path.with_suffix(".new")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def test_a_changed_file_takes_effect_after_the_interval_and_not_before(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(WIDE, encoding="utf-8")
    clock = FakeClock()
    policies = _policy(path, clock)
    assert _clouds(policies.current()) == frozenset({"public", "usgov"})
    _replace(path, NARROW)
    clock.now += 9
    assert _clouds(policies.current()) == frozenset({"public", "usgov"})
    clock.now += 1
    assert _clouds(policies.current()) == frozenset({"public"})
    _replace(path, WITH_ANONYMOUS)
    policies.request_reload()  # SIGHUP: at the next request, whatever the interval
    assert policies.current().anonymous is not None


def test_an_in_place_write_of_the_same_size_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[clients.license-server]\nclouds = ["public"]\n', encoding="utf-8")
    clock = FakeClock()
    policies = _policy(path, clock)
    stat = path.stat()
    path.write_text('[clients.license-server]\nclouds = ["usgov" ]\n', encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the change time still moves
    clock.now += 10
    assert _clouds(policies.current()) == frozenset({"usgov"})


def test_a_broken_file_keeps_the_last_good_policy_and_reports_until_fixed(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(NARROW, encoding="utf-8")
    clock = FakeClock()
    policies = _policy(path, clock)
    failures = REGISTRY.get_sample_value("attest_policy_reload_total", {"result": "failure"}) or 0.0
    _replace(path, "[clients.license-server\nnot TOML")
    for _ in range(3):
        clock.now += 10
        # Neither open nor closed: exactly the policy in force before the edit.
        assert _clouds(policies.current()) == frozenset({"public"})
        assert policies.current().anonymous is None
    assert policies.failing
    assert REGISTRY.get_sample_value("attest_policy_reload_failing") == 1
    assert [r for r in caplog.records if "policy file is unusable" in r.getMessage()]
    assert len([r for r in caplog.records if "policy file is unusable" in r.getMessage()]) == 1  # once per content
    assert REGISTRY.get_sample_value("attest_policy_reload_total", {"result": "failure"}) == failures + 1
    _replace(path, WIDE)
    clock.now += 10
    assert _clouds(policies.current()) == frozenset({"public", "usgov"})
    assert not policies.failing
    assert REGISTRY.get_sample_value("attest_policy_reload_failing") == 0


def test_a_removed_file_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(NARROW, encoding="utf-8")
    clock = FakeClock()
    policies = _policy(path, clock)
    path.unlink()
    clock.now += 10
    assert _clouds(policies.current()) == frozenset({"public"})
    assert policies.failing


def test_a_first_load_that_fails_serves_the_fallback_or_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("not = [toml", encoding="utf-8")
    clock = FakeClock()
    with pytest.raises(ConfigurationError):
        _policy(path, clock)
    fallback = load_policy(None, api_clients=CLIENTS)
    policies = _policy(path, clock, fallback=fallback)
    assert policies.current() is fallback
    assert policies.failing
    _replace(path, NARROW)
    clock.now += 10
    assert _clouds(policies.current()) == frozenset({"public"})
    assert not policies.failing


def test_without_a_file_nothing_is_reloaded() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def load() -> AccessPolicy:
        calls.append(1)
        return AccessPolicy.challenges_only()

    policies = ReloadingPolicy(load, None, interval_seconds=10, clock=clock)
    clock.now += 100
    policies.request_reload()
    assert policies.current() == AccessPolicy.challenges_only()
    assert calls == [1]
