"""The chart's refusals of values that contradict each other: each the sentence an operator needs.

Rules between two values are ``fail`` calls in ``templates/_helpers.tpl``; a JSON-schema if/then would be
reported by helm as "Must validate "then" as "if" was valid ...", which tells an operator nothing. Real helm
renders each case here, and the test holds the sentence, not just the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import pytest

from .common import HelmFailed

Render = Callable[..., list[dict[str, Any]]]

REDIS: Final = {"redisUrl": "redis://redis:6379/0"}
KEY: Final = "vendor-a:" + "ab" * 32
SAME_STORE: Final = ("each replica would keep its own SQLite store, and a document accepted by one could be "
                     "accepted again by another")

EITHER: Final = "set either {} or {}, not both"
CASES: Final[dict[str, tuple[dict[str, Any], str]]] = {
    "replicas on sqlite": (
        {"replicaCount": 2},
        ("replicaCount 2: more than one replica needs nonceStore.redisUrl (or nonceStore.existingSecret): "
         f"{SAME_STORE}")),
    "autoscaling on sqlite": (
        {"autoscaling": {"enabled": True}},
        ("autoscaling.enabled: autoscaling runs more than one replica, which needs nonceStore.redisUrl (or "
         f"nonceStore.existingSecret): {SAME_STORE}")),
    "two sources of the store url": (
        {"nonceStore": {**REDIS, "existingSecret": "attest-redis"}},
        ("nonceStore: " + EITHER.format("redisUrl", "existingSecret")
         + " (existingSecret names a Secret that holds the URL)")),
    "two sources of the keys": (
        {"apiKeys": {"keys": [KEY], "existingSecret": "attest-keys"}},
        ("apiKeys: " + EITHER.format("keys", "existingSecret")
         + " (existingSecret names a Secret that holds ATTEST_API_KEYS)")),
    "two sources of the policy": (
        {"policy": {"toml": "[anonymous]\nrequire_challenge = true\n", "existingConfigMap": "attest-policy"},
         "nonceStore": REDIS},
        ("policy: " + EITHER.format("toml", "existingConfigMap")
         + " (existingConfigMap names a ConfigMap that holds the policy)")),
    "open beside keys": (
        {"settings": {"allowOpen": True}, "apiKeys": {"keys": [KEY]}, "nonceStore": REDIS},
        ("settings.allowOpen applies only without apiKeys and without a policy: with either, who may call is "
         "already decided; remove settings.allowOpen")),
    "two sqlite volumes": (
        {"nonceStore": {"sqlite": {"existingClaim": "nonces", "persistence": {"enabled": True}}}},
        ("nonceStore.sqlite: " + EITHER.format("existingClaim", "persistence.enabled")
         + " (existingClaim names a PersistentVolumeClaim you made; persistence.enabled has the chart make one)")),
    "results without a key source": (
        {"results": {"generateKey": False}},
        ("results: set results.existingSecret (a Secret holding the PEM keys; make one with attest-service keys new "
         "DIR and kubectl create secret generic NAME --from-file=DIR), or results.generateKey true")),
}


@pytest.mark.parametrize(("values", "sentence"), CASES.values(), ids=CASES.keys())
def test_contradictory_values_fail_with_the_operators_sentence(render: Render, values: dict[str, Any],
                                                                sentence: str) -> None:
    with pytest.raises(HelmFailed) as failure:
        render(values=values)
    message = str(failure.value)
    assert sentence in message
    assert "Must validate" not in message
    assert "schema" not in message
