"""The generated result key survives ``helm upgrade``: the real helm installs and upgrades the chart against an
in-memory Kubernetes API (kube_api.py), where its ``lookup`` of the Secret finds what the install created."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attest_service.results import load_keys

from .common import CHART_DIR, NAMESPACE, RELEASE
from .kube_api import KubeApi, kube_api

pytestmark = pytest.mark.slow

SECRET = f"{RELEASE}-attest-service-result-keys"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeApi, Path]]:
    with kube_api() as (api, url):
        config = tmp_path / "kubeconfig"
        config.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: test, cluster: {{server: "{url}"}}}}]
contexts: [{{name: test, context: {{cluster: test, namespace: {NAMESPACE}}}}}]
current-context: test
users: [{{name: test, user: {{}}}}]
""", encoding="utf-8")
        config.chmod(0o600)
        yield api, config


def _generated_key(api: KubeApi) -> str:
    secret = api.get(NAMESPACE, "secrets", SECRET)
    assert secret is not None, "the install created no result-key Secret"
    return str(secret["data"]["generated.pem"])


def test_the_generated_key_is_kept_across_upgrades(helm: Callable[..., str], cluster: tuple[KubeApi, Path],
                                                   tmp_path: Path) -> None:
    api, config = cluster
    command = ("upgrade", "--install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--kubeconfig",
               str(config), "--disable-openapi-validation")
    notes = helm(*command)
    installed = _generated_key(api)
    assert "NOTE: results are signed with a key generated now" in notes
    upgraded = helm(*command, "--set", "settings.logLevel=debug")
    # Found and kept: nothing to warn about.
    assert "generated now" not in upgraded
    assert "NEW signing key" not in upgraded
    helm(*command, "--set", "results.ttlSeconds=300")
    assert _generated_key(api) == installed
    assert api.get(NAMESPACE, "secrets", f"sh.helm.release.v1.{RELEASE}.v3") is not None  # three revisions
    # The kept key is one the service loads, and the settings of the last upgrade reached the ConfigMap.
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / "generated.pem").write_bytes(base64.b64decode(installed))
    (directory / "generated.pem").chmod(0o600)
    assert load_keys(directory).signing.alg == "ES256"
    settings = api.get(NAMESPACE, "configmaps", f"{RELEASE}-attest-service-settings")
    assert settings is not None
    assert settings["data"]["ATTEST_RESULT_TTL_SECONDS"] == "300"


def test_an_upgrade_that_finds_no_key_secret_says_a_new_key_was_made(helm: Callable[..., str],
                                                                    cluster: tuple[KubeApi, Path]) -> None:
    api, config = cluster
    command = ("upgrade", "--install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--kubeconfig",
               str(config), "--disable-openapi-validation")
    helm(*command)
    installed = _generated_key(api)
    with api.lock:
        del api.objects[(f"/api/v1/namespaces/{NAMESPACE}/secrets", SECRET)]
    notes = helm(*command)
    assert "WARNING: the result-key Secret" in notes
    assert "generated a NEW signing key" in notes
    assert _generated_key(api) != installed
