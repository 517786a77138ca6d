"""settings.storeMinReplicas: unset by default, so the service picks the number from the store's topology.

The chart used to render 0, which with a Sentinel or Cluster URL let a failover forget acceptances.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from attest_service.settings import Settings

from .common import HA_VALUES, one

Render = Callable[..., list[dict[str, Any]]]


def rendered(manifests: list[dict[str, Any]]) -> str:
    value = one(manifests, "ConfigMap")["data"]["ATTEST_STORE_MIN_REPLICAS"]
    assert isinstance(value, str)
    return value


def test_default_leaves_the_number_to_the_service(render: Render) -> None:
    value = rendered(render(values={"nonceStore": {"redisUrl": "redis+sentinel://:pw@s-0:26379/mymaster/0"}}))
    assert value == ""
    # What the service makes of it: the default of the URL's topology (1 behind Sentinel, in the store).
    settings = Settings.from_env({"ATTEST_NONCE_STORE": "redis+sentinel://s-0:26379/mymaster/0",
                                  "ATTEST_STORE_MIN_REPLICAS": value})
    assert settings.store_min_replicas is None


@pytest.mark.parametrize("number", [0, 2])
def test_an_explicit_number_is_rendered(render: Render, number: int) -> None:
    assert rendered(render(values={"settings": {"storeMinReplicas": number}})) == str(number)


def test_the_ha_values_require_one_replica(render: Render) -> None:
    assert rendered(render(HA_VALUES)) == "1"
