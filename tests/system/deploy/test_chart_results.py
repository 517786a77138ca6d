"""The chart's attestation-result keys, rendered by the real helm: where they come from, how they are mounted."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attest_service.results import load_keys
from attest_service.settings import Settings

from .common import CHART_DIR, HA_VALUES, NAMESPACE, RELEASE, by_kind, one

Render = Callable[..., list[dict[str, Any]]]
KEYS_MOUNT = "/etc/attest-service/result-keys"


def _settings(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-settings"))["data"]


def _keys_volume(manifests: list[dict[str, Any]]) -> dict[str, Any] | None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    if "result-keys" not in volumes:
        assert "result-keys" not in mounts
        return None
    assert mounts["result-keys"] == {"name": "result-keys", "mountPath": KEYS_MOUNT, "readOnly": True}
    return volumes["result-keys"]


def _key_secret(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    secrets = [m for m in by_kind(manifests, "Secret") if m["metadata"]["name"].endswith("-result-keys")]
    assert len(secrets) == 1
    return secrets[0]


def test_by_default_the_chart_generates_one_p256_key_that_the_service_loads(render: Render, tmp_path: Path) -> None:
    manifests = render()
    secret = _key_secret(manifests)
    # Kept on uninstall, looked up on upgrade (the template's lookup), so the key outlives both.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert list(secret["data"]) == ["generated.pem"]
    # The file the pod sees, with the mode the kubelet gives it (defaultMode 0400, plus group read for the
    # pod's fsGroup, which is the group the service runs as): the service's own loader accepts it.
    directory = tmp_path / "result-keys"
    directory.mkdir()
    key = directory / "generated.pem"
    key.write_bytes(base64.b64decode(secret["data"]["generated.pem"]))
    volume = _keys_volume(manifests)
    assert volume is not None
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}
    key.chmod(0o400 | 0o040)
    assert load_keys(directory).signing.alg == "ES256"
    settings = Settings.from_env(_settings(manifests))
    assert settings.result_keys == Path(KEYS_MOUNT)
    assert settings.result_issuer == "http://attest-attest-service.attest-system.svc:8080"
    assert settings.result_ttl.total_seconds() == 600


def test_each_render_without_a_cluster_generates_afresh_so_the_template_must_look_the_secret_up(
        render: Render) -> None:
    # helm template has no cluster to look up: a new key each time. An install or upgrade against a cluster
    # finds the Secret and keeps its data (test_chart_upgrade.py runs that against an API server).
    first, second = (_key_secret(render())["data"]["generated.pem"] for _ in range(2))
    assert first != second


def test_a_render_without_a_cluster_that_generates_a_key_says_so_in_the_manifest(helm: Callable[..., str]) -> None:
    # GitOps renderers (Argo CD, pipelines) run helm template: the manifest they apply is the only output
    # an operator sees, so the warning is a comment in it, and the render still succeeds.
    rendered = helm("template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE)
    secret_source = next(part for part in rendered.split("\n---\n") if "secret-result-keys.yaml" in part)
    assert "# WARNING: results.generateKey generated a NEW result-signing key in this render" in secret_source
    assert "results.existingSecret" in secret_source
    quiet = helm("template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE,
                 "--set", "results.generateKey=false", "--set", "results.existingSecret=vendor-result-keys")
    assert "secret-result-keys.yaml" not in quiet
    assert "WARNING" not in quiet


def test_an_existing_secret_is_mounted_and_none_is_generated(render: Render) -> None:
    manifests = render(values={"results": {"existingSecret": "vendor-result-keys", "issuer": "https://attest.example.com",
                                           "ttlSeconds": 120, "generateKey": False}})
    assert not [m for m in by_kind(manifests, "Secret") if m["metadata"]["name"].endswith("-result-keys")]
    volume = _keys_volume(manifests)
    assert volume is not None
    assert volume["secret"]["secretName"] == "vendor-result-keys"
    settings = Settings.from_env(_settings(manifests))
    assert (settings.result_issuer, settings.result_ttl.total_seconds()) == ("https://attest.example.com", 120)


def test_results_can_be_turned_off(render: Render) -> None:
    manifests = render(values={"results": {"enabled": False}})
    assert _keys_volume(manifests) is None
    assert not [m for m in by_kind(manifests, "Secret") if m["metadata"]["name"].endswith("-result-keys")]
    assert Settings.from_env(_settings(manifests)).result_keys is None


def test_every_replica_of_the_ha_values_mounts_the_one_key_secret(render: Render) -> None:
    manifests = render(HA_VALUES)
    deployment = one(manifests, "Deployment")
    volume = _keys_volume(manifests)
    assert volume is not None
    # One Deployment, one Secret: every pod it makes (replicas or the autoscaler's) publishes the same keys,
    # and the shared store does not turn results off because the directory is given.
    assert volume["secret"]["secretName"] == _key_secret(manifests)["metadata"]["name"]
    assert deployment["spec"].get("replicas", 2) >= 2 or one(manifests, "HorizontalPodAutoscaler")
    assert Settings.from_env({**_settings(manifests), "ATTEST_NONCE_STORE": "redis://r:6379/0"}).result_keys == \
        Path(KEYS_MOUNT)
