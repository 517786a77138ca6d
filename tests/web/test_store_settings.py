"""ATTEST_STORE_MIN_REPLICAS: unset means the default of the store's topology, an explicit number is kept."""

from __future__ import annotations

import pytest

from attest_service.errors import ConfigurationError
from attest_service.settings import Settings

SENTINEL = "redis+sentinel://s1:26379/mymaster/0"


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("", None), ("  ", None), ("0", 0), ("1", 1), ("2", 2)])
def test_min_replicas_unset_or_explicit(raw: str | None, expected: int | None) -> None:
    env = {"ATTEST_NONCE_STORE": SENTINEL}
    if raw is not None:
        env["ATTEST_STORE_MIN_REPLICAS"] = raw
    assert Settings.from_env(env).store_min_replicas == expected


@pytest.mark.parametrize("raw", ["-1", "17", "one"])
def test_bad_min_replicas_stop_the_start(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="ATTEST_STORE_MIN_REPLICAS"):
        Settings.from_env({"ATTEST_NONCE_STORE": SENTINEL, "ATTEST_STORE_MIN_REPLICAS": raw})
