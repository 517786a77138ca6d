"""ATTEST_RESULT_KEYS, ATTEST_RESULT_ISSUER and ATTEST_RESULT_TTL_SECONDS as the service reads them at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from attest_service.errors import ConfigurationError
from attest_service.results import DEFAULT_ISSUER
from attest_service.settings import Settings


def _settings(**env: str) -> Settings:
    return Settings.from_env({"ATTEST_NONCE_STORE": "sqlite:////var/lib/attest/nonces.sqlite3", **env})


def test_the_embedded_store_generates_its_key_beside_the_sqlite_file() -> None:
    settings = _settings()
    assert settings.result_keys == Path("/var/lib/attest/result-keys")
    assert settings.result_keys_generated is True
    assert (settings.result_issuer, settings.result_ttl.total_seconds()) == (DEFAULT_ISSUER, 600)


@pytest.mark.parametrize("store", ["redis://cache:6379/0", "rediss://cache:6380/0",
                                   "redis+sentinel://s1:26379,s2:26379/mymaster", "redis+cluster://c1:6379"])
def test_a_shared_store_without_a_key_directory_has_results_off(store: str) -> None:
    assert _settings(ATTEST_NONCE_STORE=store).result_keys is None


def test_a_key_directory_is_used_as_given_and_off_turns_results_off() -> None:
    given = _settings(ATTEST_NONCE_STORE="redis://cache:6379/0", ATTEST_RESULT_KEYS="/etc/attest/keys")
    assert (given.result_keys, given.result_keys_generated) == (Path("/etc/attest/keys"), False)
    assert _settings(ATTEST_RESULT_KEYS="off").result_keys is None
    assert _settings(ATTEST_RESULT_KEYS="OFF").result_keys is None


def test_issuer_and_lifetime_are_read_and_checked() -> None:
    settings = _settings(ATTEST_RESULT_ISSUER="https://attest.example.com/tenant-a", ATTEST_RESULT_TTL_SECONDS="90")
    assert (settings.result_issuer, settings.result_ttl.total_seconds()) == ("https://attest.example.com/tenant-a", 90)
    for bad in ("attest.example.com", "https://attest.example.com/?x=1", "https://user@attest.example.com"):
        with pytest.raises(ConfigurationError, match="ATTEST_RESULT_ISSUER"):
            _settings(ATTEST_RESULT_ISSUER=bad)
    for bad in ("5", "86401", "ten"):
        with pytest.raises(ConfigurationError, match="ATTEST_RESULT_TTL_SECONDS"):
            _settings(ATTEST_RESULT_TTL_SECONDS=bad)
