"""The Helm chart, rendered by the real helm: lint, Kubernetes schema validation, hardening, values schema."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.callers.policy import AccessPolicy
from attest_service.server import master
from attest_service.settings import Settings
from attest_service.trust import load_trust
from tests.support import crls
from tests.trust.conftest import make_root

from .common import CHART_DIR, HA_VALUES, NAMESPACE, REPO_ROOT, HelmFailed, by_kind, one

Render = Callable[..., list[dict[str, Any]]]

#: The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
#: Kinds from CRDs, for which kubernetes-validate has no schema; their shape is asserted below instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
#: UID/GID of the image's user (Dockerfile USER).
SERVICE_UID = 10001

#: Every optional branch of the templates switched on, to validate what they render.
EVERYTHING_ON: dict[str, Any] = {
    "replicaCount": 2,
    "nonceStore": {"redisUrl": "redis+cluster://:secret@redis-0.redis:6379,redis-1.redis:6379"},
    "apiKeys": {"keys": ["vendor-a:" + "ab" * 32, "vendor-b:" + "cd" * 32]},
    "policy": {"toml": '[clients.vendor-a]\nsubscriptions = ["00000000-0000-0000-0000-000000000000"]\n'},
    "image": {"digest": "sha256:" + "0" * 64},
    "imagePullSecrets": [{"name": "registry"}],
    "podAnnotations": {"example.com/team": "attestation"},
    "podLabels": {"example.com/tier": "backend"},
    "serviceAccount": {"annotations": {"example.com/identity": "attest"}},
    "service": {"type": "ClusterIP", "port": 80, "annotations": {"example.com/lb": "internal"}},
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "podDisruptionBudget": {"minAvailable": "50%"},
    "networkPolicy": {
        "ingressFrom": [{"podSelector": {"matchLabels": {"role": "gateway"}}}],
        "redisTo": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "10.30.0.0/16"}}], "ports": [{"port": 80, "protocol": "TCP"}]}],
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True, "namespace": "monitoring", "labels": {"release": "prometheus"},
                       "additionalAlertLabels": {"team": "licensing"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "attest", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "priorityClassName": "high",
    "settings": {"revocation": "hard", "crlRefreshSeconds": 3600},
}

VALUE_SETS = {"default": (), "ha": (HA_VALUES,)}

#: The SQLite file on a claim: what callers with their own nonces need when there is no Redis.
PERSISTENT: dict[str, Any] = {"nonceStore": {"sqlite": {"existingClaim": "attest-nonces"}}}


def pinned_certs_as_values(directory: Path) -> dict[str, dict[str, dict[str, str]]]:
    """The repository's pinned_certs/ tree as the chart's pinnedCerts value (cloud -> role -> file -> text)."""
    values: dict[str, dict[str, dict[str, str]]] = {}
    for path in sorted(directory.glob("*/*/*")):
        if path.name.endswith(".pem") or path.name == "certifi.txt":
            cloud, role = path.parent.parent.name, path.parent.name
            values.setdefault(cloud, {}).setdefault(role, {})[path.name] = path.read_text(encoding="ascii")
    return values


def deployment_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of the single Deployment."""
    pod: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return pod


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The service container of the Deployment."""
    containers = deployment_pod(manifests)["containers"]
    assert len(containers) == 1
    main: dict[str, Any] = containers[0]
    return main


def env_names(manifests: list[dict[str, Any]]) -> set[str]:
    """Every environment variable the service container receives (direct and through ConfigMaps)."""
    main = container(manifests)
    names = {item["name"] for item in main.get("env", [])}
    configmaps = {m["metadata"]["name"]: m for m in by_kind(manifests, "ConfigMap")}
    for source in main.get("envFrom", []):
        names |= set(configmaps[source["configMapRef"]["name"]]["data"])
    return names


# --- lint and Kubernetes schemas ------------------------------------------------------------------------


@pytest.mark.parametrize("value_files", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(helm: Callable[..., str], value_files: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART_DIR)]
    for path in value_files:
        args += ["--values", str(path)]
    output = helm(*args)
    assert "0 chart(s) failed" in output
    assert "[ERROR]" not in output
    assert "[WARNING]" not in output


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", ["default", "ha", "everything-on", "sqlite-claim"])
def test_rendered_manifests_validate_against_kubernetes(render: Render, case: str, kubernetes_version: str) -> None:
    if case == "everything-on":
        manifests = render(values={**EVERYTHING_ON, "pinnedCerts": pinned_certs_as_values(REPO_ROOT / "pinned_certs")})
    elif case == "sqlite-claim":
        manifests = render(values={"apiKeys": EVERYTHING_ON["apiKeys"], "policy": EVERYTHING_ON["policy"],
                                   "nonceStore": {"sqlite": {"persistence": {"enabled": True,
                                                                             "storageClassName": "standard"}}}})
    else:
        manifests = render(*VALUE_SETS[case])
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields are errors too, so a misspelt key cannot silently vanish.
        kubernetes_validate.validate(manifest, kubernetes_version, strict=True)


def test_default_and_ha_render_the_expected_objects(render: Render) -> None:
    default = sorted(m["kind"] for m in render())
    assert default == sorted([
        "ConfigMap", "Deployment", "NetworkPolicy", "Pod", "PodDisruptionBudget", "Secret", "Service",
        "ServiceAccount",
    ])
    ha = sorted(m["kind"] for m in render(HA_VALUES))
    assert ha == sorted([
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "Pod", "PodDisruptionBudget",
        "PrometheusRule", "Secret", "Service", "ServiceAccount", "ServiceMonitor",
    ])


# --- hardening ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_files", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_pod_and_container_are_hardened(render: Render, value_files: tuple[Path, ...]) -> None:
    manifests = render(*value_files)
    pod = deployment_pod(manifests)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SERVICE_UID
    assert pod["securityContext"]["runAsGroup"] == SERVICE_UID
    assert pod["securityContext"]["fsGroup"] == SERVICE_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod
    assert "hostPID" not in pod

    security = container(manifests)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert isinstance(security["runAsUser"], int)
    assert security["runAsUser"] == SERVICE_UID
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("value_files", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_writable_paths_are_empty_dirs_and_probes_hit_health_routes(
    render: Render, value_files: tuple[Path, ...],
) -> None:
    manifests = render(*value_files)
    main = container(manifests)
    volumes = {v["name"]: v for v in deployment_pod(manifests)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "emptyDir" in volumes[mounts["/var/lib/attest-service"]]

    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for kind in ("requests", "limits"):
        assert set(main["resources"][kind]) >= {"cpu", "memory"}


def test_service_account_token_is_not_mounted(render: Render) -> None:
    manifests = render()
    account = one(manifests, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert deployment_pod(manifests)["serviceAccountName"] == account["metadata"]["name"]


def test_settings_reach_the_container_under_the_contract_names(render: Render) -> None:
    settings = {
        "ATTEST_CHALLENGE_TTL_SECONDS", "ATTEST_CLOCK_SKEW_SECONDS", "ATTEST_STORE_TIMEOUT_SECONDS",
        "ATTEST_RATE_LIMIT_PER_MINUTE", "ATTEST_TRUST_RELOAD_SECONDS", "ATTEST_LOG_LEVEL", "ATTEST_PINNED_CERTS",
        "ATTEST_NONCE_STORE", "ATTEST_STORE_MIN_REPLICAS", "ATTEST_AIA_FETCH", "ATTEST_FINGERPRINT_FETCH",
        "ATTEST_ALLOW_OPEN",
        "ATTEST_TRUSTED_PROXIES", "ATTEST_AUTH_FAILURES_PER_MINUTE", "ATTEST_ANONYMOUS_CHALLENGES",
        "ATTEST_BODY_TIMEOUT_SECONDS", "ATTEST_REVOCATION", "ATTEST_CRL_REFRESH_SECONDS", "ATTEST_LOG_FORMAT",
        "ATTEST_RESULT_KEYS", "ATTEST_RESULT_ISSUER", "ATTEST_RESULT_TTL_SECONDS",
    }
    assert env_names(render()) == settings
    assert env_names(render(HA_VALUES)) == settings | {"ATTEST_API_KEYS"}
    everything = render(values=EVERYTHING_ON)
    assert env_names(everything) == settings | {"ATTEST_API_KEYS", "ATTEST_POLICY_FILE"}
    # With Sentinel, an acceptance waits for the replica (a failover must not forget it); AIA stays off.
    ha = one(render(HA_VALUES), "ConfigMap")["data"]
    assert (ha["ATTEST_STORE_MIN_REPLICAS"], ha["ATTEST_AIA_FETCH"]) == ("1", "0")


def _service_settings(manifests: list[dict[str, Any]]) -> Settings:
    """The service's settings from the rendered ConfigMap, as the container reads them."""
    data = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-settings"))["data"]
    return Settings.from_env(data)


def test_default_values_admit_keyless_callers_with_challenges_only(render: Render) -> None:
    # No keys, no policy, and the pod listens on 0.0.0.0: a captured document with its VM's own nonce must
    # not be accepted for whoever submits it first.
    manifests = render()
    bind = container(manifests)["args"][container(manifests)["args"].index("--bind") + 1]
    assert not master.is_loopback(bind.rpartition(":")[0])
    settings = _service_settings(manifests)
    assert settings.allow_open is False
    assert master.access_policy(settings, loopback=False) == AccessPolicy.challenges_only()


def test_abuse_settings_reach_the_service(render: Render) -> None:
    settings = _service_settings(render(values={"settings": {
        "trustedProxies": ["10.0.0.0/8", "fd00::/8"], "authFailuresPerMinute": 5, "anonymousChallenges": 7,
        "bodyTimeoutSeconds": 2.5}}))
    assert [str(network) for network in settings.trusted_proxies] == ["10.0.0.0/8", "fd00::/8"]
    assert (settings.auth_failures_per_minute, settings.anonymous_challenges) == (5, 7)
    assert settings.body_timeout_seconds == 2.5
    defaults = _service_settings(render())
    assert defaults.trusted_proxies == ()
    assert (defaults.auth_failures_per_minute, defaults.anonymous_challenges) == (30, 300)
    assert defaults.body_timeout_seconds == 10


def test_allow_open_reaches_the_service(render: Render) -> None:
    settings = _service_settings(render(values={"settings": {"allowOpen": True}, **PERSISTENT}))
    assert master.access_policy(settings, loopback=False) == AccessPolicy.open()


def test_sqlite_store_runs_one_pod_at_a_time(render: Render) -> None:
    manifests = render()
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # A rolling update would briefly run two pods with two separate nonce files.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    settings = one(manifests, "ConfigMap")["data"]
    assert settings["ATTEST_NONCE_STORE"] == "sqlite:////var/lib/attest-service/nonces.sqlite3"


def test_sqlite_store_can_use_a_persistent_volume_claim(render: Render) -> None:
    pod = deployment_pod(render(values={"nonceStore": {"sqlite": {"existingClaim": "attest-nonces"}}}))
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state == {"name": "state", "persistentVolumeClaim": {"claimName": "attest-nonces"}}


#: Values that let callers choose their own nonces, each alone.
CALLER_NONCES: dict[str, dict[str, Any]] = {
    "api keys": {"apiKeys": {"keys": ["vendor-a:" + "ab" * 32]}},
    "api keys from a secret": {"apiKeys": {"existingSecret": "attest-keys"}},
    "inline policy": {"policy": {"toml": "[anonymous]\nrequire_challenge = false\n"}},
    "policy from a config map": {"policy": {"existingConfigMap": "attest-policy"}},
    "open mode": {"settings": {"allowOpen": True}},
}


@pytest.mark.parametrize("values", CALLER_NONCES.values(), ids=CALLER_NONCES.keys())
def test_callers_with_their_own_nonces_need_a_persistent_sqlite_file(render: Render, values: dict[str, Any]) -> None:
    # An emptyDir forgets every accepted nonce with the pod: a captured document could be replayed after a
    # restart for the rest of its life. So no volume, no rendering, and the message says what to set.
    with pytest.raises(HelmFailed, match=r"sqlite\.existingClaim or nonceStore\.sqlite\.persistence\.enabled"):
        render(values=values)
    claim = deployment_pod(render(values={**values, **PERSISTENT}))
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "attest-nonces"}} in claim["volumes"]
    made = render(values={**values, "nonceStore": {"sqlite": {"persistence": {"enabled": True}}}})
    pvc = one(made, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "attest-attest-service-nonces"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "attest-attest-service-nonces"}} in \
        deployment_pod(made)["volumes"]
    # The documented opt-in to losing nonces on restart renders the emptyDir.
    lossy = deployment_pod(render(values={**values, "nonceStore": {"sqlite": {"acceptNonceLossOnRestart": True}}}))
    assert {"name": "state", "emptyDir": {}} in lossy["volumes"]
    # With Redis nothing of this applies.
    shared = render(values={**values, "nonceStore": {"redisUrl": "redis://redis:6379"}})
    assert not by_kind(shared, "PersistentVolumeClaim")


def test_the_default_install_keeps_rendering_on_an_empty_dir(render: Render) -> None:
    # No keys, no policy: callers use service-issued challenges only, which a restart cannot turn into replays.
    manifests = render()
    assert {"name": "state", "emptyDir": {}} in deployment_pod(manifests)["volumes"]
    assert not by_kind(manifests, "PersistentVolumeClaim")


def test_the_chart_made_claim_takes_a_size_and_a_storage_class(render: Render) -> None:
    pvc = one(render(values={"nonceStore": {"sqlite": {"persistence": {
        "enabled": True, "size": "5Gi", "storageClassName": "fast-ssd"}}}}), "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    with pytest.raises(HelmFailed, match=r"either existingClaim or persistence\.enabled"):
        render(values={"nonceStore": {"sqlite": {"existingClaim": "c", "persistence": {"enabled": True}}}})


def settings_secrets(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart's Secrets but the one of the result-signing keys (tests/system/deploy/test_chart_results.py)."""
    return [m for m in by_kind(manifests, "Secret") if not m["metadata"]["name"].endswith("-result-keys")]


def test_redis_url_and_api_keys_come_from_secrets(render: Render) -> None:
    manifests = render(values=EVERYTHING_ON)
    secret = one(settings_secrets(manifests), "Secret")
    assert set(secret["data"]) == {"ATTEST_API_KEYS", "ATTEST_NONCE_STORE"}
    env = {item["name"]: item for item in container(manifests)["env"]}
    for name in ("ATTEST_API_KEYS", "ATTEST_NONCE_STORE"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": name}
    assert "ATTEST_NONCE_STORE" not in by_kind(manifests, "ConfigMap")[0]["data"]

    ha = render(HA_VALUES)
    assert not settings_secrets(ha), "existingSecret must not make the chart create one"
    env = {item["name"]: item for item in container(ha)["env"]}
    assert env["ATTEST_NONCE_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "attest-service-runtime"
    assert one(ha, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"


def test_secret_content_change_rolls_the_pods(render: Render) -> None:
    first = one(render(values={"apiKeys": {"keys": ["a:" + "0" * 64]}, **PERSISTENT}), "Deployment")
    second = one(render(values={"apiKeys": {"keys": ["a:" + "1" * 64]}, **PERSISTENT}), "Deployment")
    annotations = ("checksum/secret",)
    for name in annotations:
        assert first["spec"]["template"]["metadata"]["annotations"][name] != \
            second["spec"]["template"]["metadata"]["annotations"][name]


def test_the_redis_tls_secret_is_mounted_where_the_url_names_its_files(render: Render) -> None:
    # rediss+sentinel://...?ssl_ca_certs=/etc/attest-service/redis-tls/ca.crt needs the CA in the pod.
    values = {"nonceStore": {"redisUrl": "rediss+sentinel://s-0.redis:26379/mymaster/0?ssl_ca_certs="
                                         "/etc/attest-service/redis-tls/ca.crt", "tlsSecret": "redis-tls"}}
    manifests = render(values=values)
    pod = deployment_pod(manifests)
    assert {"name": "redis-tls", "secret": {"secretName": "redis-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "redis-tls", "mountPath": "/etc/attest-service/redis-tls", "readOnly": True} in \
        container(manifests)["volumeMounts"]
    # The shipped HA values speak TLS to Sentinel with the CA of their own Secret.
    ha = deployment_pod(render(HA_VALUES))
    assert {"name": "redis-tls", "secret": {"secretName": "attest-service-redis-tls", "defaultMode": 0o440}} in \
        ha["volumes"]
    # Without Redis there is nothing to mount.
    assert all(volume["name"] != "redis-tls" for volume in deployment_pod(render(
        values={"nonceStore": {"tlsSecret": "redis-tls"}}))["volumes"])


def test_a_policy_change_rolls_the_pods(render: Render) -> None:
    # The policy used to be read once per worker and hashed nowhere: after an upgrade, old workers kept the
    # wider policy while respawned ones took the new one.
    def annotations(toml: str) -> dict[str, str]:
        values = {"apiKeys": {"keys": ["a:" + "0" * 64]}, "policy": {"toml": toml}, **PERSISTENT}
        found: dict[str, str] = one(render(values=values), "Deployment")["spec"]["template"]["metadata"][
            "annotations"]
        return found

    wide = annotations('[clients.a]\nclouds = ["public", "usgov"]\n')
    narrow = annotations('[clients.a]\nclouds = ["public"]\n')
    assert wide["checksum/policy"] != narrow["checksum/policy"]
    assert wide["checksum/settings"] == narrow["checksum/settings"]
    assert annotations('[clients.a]\nclouds = ["public"]\n') == narrow


def test_pinned_certificates_from_values_reproduce_the_bundled_layout(render: Render) -> None:
    bundled = REPO_ROOT / "pinned_certs"
    pins = pinned_certs_as_values(bundled)
    manifests = render(values={"pinnedCerts": pins})
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-pinned-certs"))
    pod = deployment_pod(manifests)
    volume = next(v for v in pod["volumes"] if v["name"] == "pinned-certs")
    mount = next(m for m in container(manifests)["volumeMounts"] if m["name"] == "pinned-certs")
    assert mount["mountPath"] == "/etc/attest-service/pinned_certs"
    assert mount["readOnly"] is True
    settings = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-settings"))
    assert settings["data"]["ATTEST_PINNED_CERTS"] == mount["mountPath"]

    mounted = {item["path"]: configmap["data"][item["key"]] for item in volume["configMap"]["items"]}
    expected = {
        f"{cloud}/{role}/{name}": text
        for cloud, roles in pins.items() for role, files in roles.items() for name, text in files.items()
    }
    assert set(mounted) == set(expected)
    for path, text in expected.items():
        assert mounted[path].strip() == text.strip(), path


def test_bundled_pins_are_used_when_values_give_none(render: Render) -> None:
    manifests = render()
    assert not any(m["metadata"]["name"].endswith("-pinned-certs") for m in by_kind(manifests, "ConfigMap"))
    assert all(v["name"] != "pinned-certs" for v in deployment_pod(manifests)["volumes"])


def test_disruption_budget_and_autoscaler(render: Render) -> None:
    default = render()
    assert one(default, "PodDisruptionBudget")["apiVersion"] == "policy/v1"
    assert not by_kind(default, "HorizontalPodAutoscaler")

    ha = render(HA_VALUES)
    budget = one(ha, "PodDisruptionBudget")
    assert budget["spec"] == {
        "minAvailable": 2,
        "selector": one(ha, "Deployment")["spec"]["selector"],
    }
    autoscaler = one(ha, "HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": one(ha, "Deployment")["metadata"]["name"],
    }
    assert autoscaler["spec"]["minReplicas"] >= 3
    assert autoscaler["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    # The autoscaler owns the replica count: a fixed one would fight it on every upgrade.
    assert "replicas" not in one(ha, "Deployment")["spec"]


def test_topology_spread_selects_the_service_pods(render: Render) -> None:
    manifests = render(HA_VALUES)
    selector = one(manifests, "Deployment")["spec"]["selector"]
    constraints = deployment_pod(manifests)["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == ["topology.kubernetes.io/zone"]
    assert all(c["labelSelector"] == selector for c in constraints)
    assert len(deployment_pod(render())["topologySpreadConstraints"]) == 2


def test_network_policy_limits_ingress_and_egress(render: Render) -> None:
    default = one(render(), "NetworkPolicy")["spec"]
    assert default["policyTypes"] == ["Ingress", "Egress"]
    assert default["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    # Without Redis the pods need name resolution, and HTTP(S) for the bundled China pins' background fetch
    # (test_chart_fetch_egress.py).
    assert default["egress"][0] == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert [rule["ports"] for rule in default["egress"][1:]] == [[{"port": 80, "protocol": "TCP"},
                                                                  {"port": 443, "protocol": "TCP"}]]

    manifests = render(HA_VALUES)
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == one(manifests, "Deployment")["spec"]["selector"]
    peers = policy["ingress"][0]["from"]
    test_pod_labels = one(manifests, "Pod")["metadata"]["labels"]
    assert {"podSelector": {"matchLabels": test_pod_labels}} in peers
    redis_rule = policy["egress"][1]
    assert {p["port"] for p in redis_rule["ports"]} == {6379, 26379}
    assert redis_rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}]


def test_service_monitor_shape(render: Render) -> None:
    assert not by_kind(render(), "ServiceMonitor")
    manifests = render(HA_VALUES)
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"] == {"matchLabels": service["spec"]["selector"]}
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"


def test_helm_test_pod_checks_readiness_without_posing_as_a_server(render: Render) -> None:
    manifests = render()
    pod = one(manifests, "Pod")
    service = one(manifests, "Service")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [check] = pod["spec"]["containers"]
    script = check["command"][-1]
    assert '"/readyz"' in script
    assert service["metadata"]["name"] in script
    assert check["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    # The Service must never route client traffic to the test pod.
    selector = service["spec"]["selector"].items()
    assert not set(selector) <= set(pod["metadata"]["labels"].items())


def test_service_targets_the_container_port(render: Render) -> None:
    manifests = render()
    [port] = one(manifests, "Service")["spec"]["ports"]
    [container_port] = container(manifests)["ports"]
    assert port["targetPort"] == container_port["name"] == "http"
    assert container_port["containerPort"] == 8080


# --- values schema ------------------------------------------------------------------------------------------


REFUSED_VALUES = {
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                               "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                               "runAsUsr": 10001}},
    "wrong type: replicaCount string": {"replicaCount": "three"},
    "wrong type: workers float": {"server": {"workers": 2.5}},
    "wrong type: apiKeys string": {"apiKeys": {"keys": "vendor-a:" + "ab" * 32}},
    "writable root filesystem": {"securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                                     "readOnlyRootFilesystem": False,
                                                     "capabilities": {"drop": ["ALL"]}}},
    "root user": {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 0, "runAsGroup": 0, "fsGroup": 0,
                                         "seccompProfile": {"type": "RuntimeDefault"}}},
    "redis url of another scheme": {"nonceStore": {"redisUrl": "http://redis:6379"}},
    "api key not a sha256": {"apiKeys": {"keys": ["vendor-a:secret"]}},
    "pinned cert for unknown cloud": {"pinnedCerts": {"mars": {"roots": {}}}},
    "pinned cert that is not PEM": {"pinnedCerts": {"public": {"roots": {"x.pem": "hello"}}}},
    "pinned file with a path": {"pinnedCerts": {"public": {"roots": {"../x.pem": "-----BEGIN CERTIFICATE-----"}}}},
    "trusted proxy that is not an address": {"settings": {"trustedProxies": ["ingress.local"]}},
    "trusted proxies as a string": {"settings": {"trustedProxies": "10.0.0.0/8"}},
    "allowOpen as a string": {"settings": {"allowOpen": "yes"}},
    "body timeout of zero": {"settings": {"bodyTimeoutSeconds": 0}},
    "body timeout as a string": {"settings": {"bodyTimeoutSeconds": "10s"}},
}


@pytest.mark.parametrize("values", REFUSED_VALUES.values(), ids=REFUSED_VALUES.keys())
def test_schema_refuses(render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(HelmFailed, match="values don't meet the specifications of the schema"):
        render(values=values)


def test_schema_refuses_multiple_replicas_on_sqlite_with_a_clear_message(render: Render) -> None:
    with pytest.raises(HelmFailed) as failure:
        render(values={"replicaCount": 3})
    assert "nonceStore" in str(failure.value)


@pytest.mark.parametrize("store", [
    {"redisUrl": "redis+sentinel://:pw@sentinel-0:26379,sentinel-1:26379/mymaster/0"},
    {"existingSecret": "attest-redis"},
])
def test_schema_accepts_multiple_replicas_with_redis(render: Render, store: dict[str, str]) -> None:
    deployment = one(render(values={"replicaCount": 3, "nonceStore": store}), "Deployment")
    assert deployment["spec"]["replicas"] == 3


@pytest.mark.parametrize(("values", "message"), [
    ({"nonceStore": {"redisUrl": "redis://r:6379/0", "existingSecret": "s"}}, "either redisUrl or existingSecret"),
    ({"apiKeys": {"keys": ["a:" + "0" * 64], "existingSecret": "s"}}, "either keys or existingSecret"),
    ({"settings": {"allowOpen": True}, "apiKeys": {"keys": ["a:" + "0" * 64]}}, "allowOpen applies only"),
    ({"settings": {"allowOpen": True}, "policy": {"toml": "[anonymous]\nrequire_challenge = true\n"}},
     "allowOpen applies only"),
])
def test_contradictory_values_fail_rendering(render: Render, values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmFailed, match=message):
        render(values=values)


def test_every_value_is_documented_with_a_comment() -> None:
    """Each key in values.yaml sits right under a comment, except fields of Kubernetes-shaped blocks."""
    lines = (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        if index and lines[index - 1].strip().startswith("#"):
            continue
        if _inside_kubernetes_block(lines, index):
            continue
        undocumented.append(f"values.yaml:{index + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)


#: Top-level values whose fields are Kubernetes API fields (documented upstream), commented as a block.
KUBERNETES_BLOCKS = ("resources:", "podSecurityContext:", "securityContext:")


def _inside_kubernetes_block(lines: list[str], index: int) -> bool:
    """True for a nested key whose top-level block is one of KUBERNETES_BLOCKS, or a probe's field."""
    indent = len(lines[index]) - len(lines[index].lstrip())
    if indent == 0:
        return False
    top = next(line for line in reversed(lines[:index]) if line.strip() and not line.startswith((" ", "#")))
    return top.strip() in KUBERNETES_BLOCKS or (top.strip() == "probes:" and indent > 2)


# --- revocation: the mode, and the CRL fetch beside the service ---------------------------------------------


def test_revocation_settings_reach_the_service(render: Render) -> None:
    assert _service_settings(render()).revocation == "soft"
    assert _service_settings(render()).crl_refresh_seconds == 0
    assert not deployment_pod(render()).get("initContainers")
    settings = _service_settings(render(values={"settings": {"revocation": "hard"}}))
    assert settings.revocation == "hard"


@pytest.mark.parametrize("values", [{"revocation": "strict"}, {"crlRefreshSeconds": 30}, {"crlRefreshSeconds": -1}],
                         ids=["unknown mode", "too often", "negative"])
def test_schema_refuses_revocation_values(render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(HelmFailed):
        render(values={"settings": values})


def _trust_script(manifests: list[dict[str, Any]]) -> str:
    [init] = deployment_pod(manifests)["initContainers"]
    assert init["name"] == "trust-directory"
    assert init["command"][:2] == ["/bin/sh", "-c"]
    script: str = init["command"][2]
    return script


def test_crl_refresh_assembles_a_writable_trust_directory(render: Render, tmp_path: Path) -> None:
    bundled = REPO_ROOT / "pinned_certs"
    manifests = render(values={"settings": {"crlRefreshSeconds": 3600}, "pinnedCerts": pinned_certs_as_values(bundled)})
    settings = _service_settings(manifests)
    assert settings.crl_refresh_seconds == 3600
    assert str(settings.pinned_certs) == "/var/lib/attest-service-trust"
    pod = deployment_pod(manifests)
    volumes = {v["name"]: v for v in pod["volumes"]}
    [init] = pod["initContainers"]
    assert init["securityContext"] == container(manifests)["securityContext"]
    for mounts in (init["volumeMounts"], container(manifests)["volumeMounts"]):
        trust = next(m for m in mounts if m["mountPath"] == "/var/lib/attest-service-trust")
        assert "emptyDir" in volumes[trust["name"]]
        assert not trust.get("readOnly")
        pins = next(m for m in mounts if m["mountPath"] == "/etc/attest-service/pinned_certs")
        assert pins["readOnly"] is True

    # The script, run for real against a copy of the pins (the paths moved under the test's directory): the
    # assembled directory trusts what the pins say, and takes CRLs.
    source, target = tmp_path / "pins", tmp_path / "trust"
    shutil.copytree(bundled, source)
    script = _trust_script(manifests).replace("/etc/attest-service/pinned_certs", str(source)).replace(
        "/var/lib/attest-service-trust", str(target))
    for _ in range(2):  # a restarted pod runs it again over what it made
        subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
    assembled, pinned = load_trust(target), load_trust(source)
    assert sorted(p.sha256 for p in assembled.all_pins()) == sorted(p.sha256 for p in pinned.all_pins())
    assert (target / "public" / "crls").is_dir()
    assert (target / "public" / "roots").is_symlink()
    # An edit of the pins reaches the assembled directory through its links.
    (source / "public" / "intermediates" / "microsoft-tls-g2-rsa-ca-ocsp-02.pem").unlink()
    assert len(list(load_trust(target).for_cloud("public").intermediates)) == len(
        list(pinned.for_cloud("public").intermediates)) - 1


def test_crls_from_values_land_in_the_crls_folder(render: Render, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root = make_root("Chart Test Root", now)
    crl = crls.pem(crls.make_crl(root, now=now)).decode()
    pem = root.certificate.public_bytes(serialization.Encoding.PEM).decode()
    pins = {"public": {"roots": {"root.pem": pem}, "crls": {"root.crl": crl}}}
    manifests = render(values={"pinnedCerts": pins})
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-pinned-certs"))
    volume = next(v for v in deployment_pod(manifests)["volumes"] if v["name"] == "pinned-certs")
    # Written out as the pod sees the ConfigMap: the CRL is in use.
    for item in volume["configMap"]["items"]:
        path = tmp_path / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configmap["data"][item["key"]])
    [used] = load_trust(tmp_path).for_cloud("public").crls
    assert used.source == "public/crls/root.crl"
    with pytest.raises(HelmFailed):
        render(values={"pinnedCerts": {"public": {"crls": {"root.crl": "not a CRL"}}}})
