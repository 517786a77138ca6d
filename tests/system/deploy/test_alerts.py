"""The shipped alert rules, checked and unit-tested by the real promtool, and their PrometheusRule in the chart."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy
from tests.support import tools
from tests.trust.conftest import make_ca, make_leaf, make_root

from .common import CHART_DIR, HA_VALUES, RELEASE, HelmFailed, by_kind, one

Render = Callable[..., list[dict[str, Any]]]

RULES_FILE = CHART_DIR / "files" / "alerts.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
#: The alerts the chart ships, in the order of the rules file.
ALERTS = ("AttestUnpinnedIssuer", "AttestUnprovenIssuer", "AttestPinExpiringSoon", "AttestTrustReloadFailing",
          "AttestStoreUnavailable", "AttestVerificationFailureRatio", "AttestCrlStale", "AttestRevokedDocuments",
          "AttestResultKeysReloadFailing")
#: promtool checks and unit-tests these rules in well under a second; this only stops a hung process.
PROMTOOL_TIMEOUT_SECONDS = 60
FULLNAME = f"{RELEASE}-attest-service"


@pytest.fixture(scope="session")
def promtool() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real promtool (Debian's prometheus package, which `make test` installs when it is missing).

    Missing promtool fails the test under CI=true: a green CI must mean the rules were tested. Elsewhere the
    test is skipped with the reason, so that a developer without the package can run the rest.
    """
    binary = tools.require("promtool")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                              timeout=PROMTOOL_TIMEOUT_SECONDS, check=False)

    return run


def rendered_rules(render: Render, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec (a Prometheus rule file: {"groups": [...]}) with the PrometheusRule enabled."""
    settings: dict[str, Any] = {"enabled": True, **(values or {})}
    spec: dict[str, Any] = one(render(values={"prometheusRule": settings}), "PrometheusRule")["spec"]
    return spec


def write_rules(directory: Path, rules: dict[str, Any]) -> Path:
    """``rules`` as a rule file in ``directory``, with the unit tests beside it pointing at it."""
    rules_path = directory / "rendered-alerts.yaml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    unit_tests["rule_files"] = [rules_path.name]
    (directory / "alerts_test.yaml").write_text(yaml.safe_dump(unit_tests, sort_keys=False), encoding="utf-8")
    return rules_path


def source_rules() -> dict[str, Any]:
    """The rules file as shipped."""
    rules: dict[str, Any] = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return rules


def alerts_of(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every alerting rule of a rule file, by alert name."""
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def passed(result: subprocess.CompletedProcess[str]) -> str:
    """promtool's output, after asserting that it exited 0."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


# --- promtool on the rules file and on the chart's rendering -------------------------------------------------


def test_rules_file_passes_promtool_check(promtool: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    output = passed(promtool("check", "rules", RULES_FILE))
    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_rendered_rules_pass_promtool_check(promtool: Callable[..., subprocess.CompletedProcess[str]],
                                            render: Render, tmp_path: Path) -> None:
    rules_path = write_rules(tmp_path, rendered_rules(render))
    output = passed(promtool("check", "rules", rules_path))
    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_unit_tests_pass_on_the_rules_file(promtool: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    output = passed(promtool("test", "rules", UNIT_TESTS))
    assert "SUCCESS" in output


def test_unit_tests_pass_on_the_rendered_rules(promtool: Callable[..., subprocess.CompletedProcess[str]],
                                               render: Render, tmp_path: Path) -> None:
    write_rules(tmp_path, rendered_rules(render))
    output = passed(promtool("test", "rules", tmp_path / "alerts_test.yaml"))
    assert "SUCCESS" in output


def test_unit_tests_fail_when_the_thresholds_change(promtool: Callable[..., subprocess.CompletedProcess[str]],
                                                    render: Render, tmp_path: Path) -> None:
    """The unit tests pin the thresholds down: rules rendered with other values fail them, by alert."""
    rules = rendered_rules(render, {"alerts": {
        "AttestPinExpiringSoon": {"days": 10},
        "AttestVerificationFailureRatio": {"ratio": 0.5},
    }})
    write_rules(tmp_path, rules)
    result = promtool("test", "rules", tmp_path / "alerts_test.yaml")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "alertname: AttestPinExpiringSoon" in output
    assert "alertname: AttestVerificationFailureRatio" in output
    for untouched in ("AttestUnpinnedIssuer", "AttestUnprovenIssuer", "AttestTrustReloadFailing",
                      "AttestStoreUnavailable", "AttestCrlStale", "AttestRevokedDocuments",
                      "AttestResultKeysReloadFailing"):
        assert f"alertname: {untouched}" not in output


def test_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    """At least one evaluation expects each alert to fire, and one expects it to stay quiet."""
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    assert unit_tests["rule_files"] == [os.path.relpath(RULES_FILE, UNIT_TESTS.parent)]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in unit_tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == quiet == set(ALERTS)


# --- the PrometheusRule of the chart ---------------------------------------------------------------------------


def test_default_render_has_no_prometheus_rule(render: Render) -> None:
    assert not by_kind(render(), "PrometheusRule")


def test_default_values_render_the_rules_file_unchanged(render: Render) -> None:
    assert rendered_rules(render) == source_rules()
    assert tuple(alerts_of(source_rules())) == ALERTS


def test_values_configure_every_alert_of_the_rules_file() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    configured = values["prometheusRule"]["alerts"]
    assert tuple(configured) == ALERTS
    for name, rule in alerts_of(source_rules()).items():
        # The defaults are the file's own settings, so that the file is what the chart ships by default.
        assert configured[name]["severity"] == rule["labels"]["severity"]
        assert configured[name]["for"] == rule["for"]


def test_prometheus_rule_shape(render: Render) -> None:
    manifests = render(values={"prometheusRule": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "kube-prometheus-stack"},
    }})
    rule = one(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == FULLNAME
    assert rule["metadata"]["namespace"] == "monitoring"
    labels = rule["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert set(rule["spec"]) == {"groups"}
    [group] = rule["spec"]["groups"]
    assert group["name"] == "attest-service"
    for alert in group["rules"]:
        assert set(alert) == {"alert", "expr", "for", "labels", "annotations"}
        assert isinstance(alert["expr"], str)
        assert alert["expr"]
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}
        assert alert["labels"]["severity"] in {"critical", "warning"}


def test_ha_values_ship_the_alerts_to_the_prometheus_of_the_service_monitor(render: Render) -> None:
    manifests = render(HA_VALUES)
    rule = one(manifests, "PrometheusRule")
    monitor = one(manifests, "ServiceMonitor")
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    assert rule["spec"] == source_rules()


def test_prometheus_rule_defaults_to_the_release_namespace(render: Render) -> None:
    # Like every other object of the chart: no namespace field, so `helm install -n` decides.
    rule = one(render(values={"prometheusRule": {"enabled": True}}), "PrometheusRule")
    assert "namespace" not in rule["metadata"]


def test_values_set_severity_duration_labels_and_thresholds(render: Render) -> None:
    rules = alerts_of(rendered_rules(render, {
        "additionalAlertLabels": {"team": "licensing"},
        "alerts": {
            "AttestUnpinnedIssuer": {"severity": "page", "for": "1m"},
            "AttestPinExpiringSoon": {"days": 45},
            "AttestVerificationFailureRatio": {"ratio": 0.2, "minVerifications": 100},
            "AttestStoreUnavailable": {"enabled": False},
        },
    }))
    source = alerts_of(source_rules())
    assert "AttestStoreUnavailable" not in rules
    assert rules["AttestUnpinnedIssuer"]["labels"] == {"severity": "page", "team": "licensing"}
    assert rules["AttestUnpinnedIssuer"]["for"] == "1m"
    assert rules["AttestTrustReloadFailing"]["labels"] == {"severity": "warning", "team": "licensing"}
    assert rules["AttestPinExpiringSoon"]["expr"] == source["AttestPinExpiringSoon"]["expr"].replace(
        "30 * 86400", "45 * 86400")
    ratio = rules["AttestVerificationFailureRatio"]["expr"]
    assert ratio == source["AttestVerificationFailureRatio"]["expr"].replace("> 0.05", "> 0.2").replace(
        ">= 20", ">= 100")
    assert rules["AttestTrustReloadFailing"]["expr"] == source["AttestTrustReloadFailing"]["expr"]


def test_all_alerts_disabled_render_no_empty_group(render: Render) -> None:
    spec = rendered_rules(render, {"alerts": {name: {"enabled": False} for name in ALERTS}})
    assert spec == {"groups": []}


def test_rendered_rules_with_changed_values_pass_promtool_check(
        promtool: Callable[..., subprocess.CompletedProcess[str]], render: Render, tmp_path: Path) -> None:
    rules = rendered_rules(render, {"alerts": {
        "AttestPinExpiringSoon": {"days": 7},
        "AttestVerificationFailureRatio": {"ratio": 0.001, "minVerifications": 1},
    }})
    passed(promtool("check", "rules", write_rules(tmp_path, rules)))


def test_template_fails_when_a_threshold_literal_leaves_the_rules_file(
        helm: Callable[..., str], tmp_path: Path) -> None:
    """A rules file edited so that a value no longer applies stops the rendering, naming the alert."""
    chart = tmp_path / "attest-service"
    shutil.copytree(CHART_DIR, chart)
    rules = chart / "files" / "alerts.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("> 0.05", "> 0.1"), encoding="utf-8")
    with pytest.raises(HelmFailed, match="AttestVerificationFailureRatio no longer contains"):
        helm("template", RELEASE, str(chart), "--set", "prometheusRule.enabled=true")


REFUSED_VALUES = {
    "unknown alert": {"alerts": {"AttestSomethingElse": {"enabled": True}}},
    "unknown alert field": {"alerts": {"AttestPinExpiringSoon": {"threshold": 3}}},
    "ratio of zero": {"alerts": {"AttestVerificationFailureRatio": {"ratio": 0}}},
    "ratio above one": {"alerts": {"AttestVerificationFailureRatio": {"ratio": 5}}},
    "days as a string": {"alerts": {"AttestPinExpiringSoon": {"days": "30"}}},
    "duration in words": {"alerts": {"AttestStoreUnavailable": {"for": "3 minutes"}}},
    "empty severity": {"alerts": {"AttestStoreUnavailable": {"severity": ""}}},
    "alert label overriding severity": {"additionalAlertLabels": {"severity": "info"}},
    "alert label that is no label name": {"additionalAlertLabels": {"team-name": "x"}},
}


@pytest.mark.parametrize("values", REFUSED_VALUES.values(), ids=REFUSED_VALUES.keys())
def test_schema_refuses(render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(HelmFailed, match="values don't meet the specifications of the schema"):
        render(values={"prometheusRule": {"enabled": True, **values}})


# --- forged documents against the rules, end to end -------------------------------------------------------------

#: What the review sent: 34 forged documents took 31 issuer labels and fired the critical alert.
FORGED_DOCUMENTS = 34


def _unpinned_issuer_samples() -> dict[str, float]:
    return {sample.labels["issuer"]: sample.value for metric in REGISTRY.collect()
            if metric.name == "attest_unpinned_issuer" for sample in metric.samples
            if sample.name == "attest_unpinned_issuer_total"}


def test_forged_documents_take_no_label_and_page_nobody(promtool: Callable[..., subprocess.CompletedProcess[str]],
                                                        tmp_path: Path) -> None:
    """The service's own counter after 34 forged documents and one genuine rotation, replayed under promtool.

    Each forged document's issuer claims Microsoft's organisation and an allow-listed caIssuers URL and is
    carried in the document, under a root that is not pinned. Only the genuine CA (under the pinned root,
    carried beside its signer) gets a label and pages; the forgeries neither page nor warn.
    """
    now = datetime.now(UTC)
    root = make_root("Alerts Test Root", now)
    pinned = tmp_path / "pins"
    pki.write_pinned_dir(pinned, "public", root=root.certificate,
                         intermediates=[make_ca("Alerts Test Issuing CA 01", root, now).certificate])
    holder = ReloadingVerifier(pinned, interval_seconds=60)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forger = make_root("Microsoft RSA Root Certificate Authority 2017", now)
    genuine = make_ca("Alerts Rotation CA 02", root, now)
    documents = [(ca, make_leaf(ca, key, now, ca_issuers=[f"http://www.microsoft.com/pkiops/certs/ca{index}.crt"]))
                 for index, ca in enumerate([make_ca(f"Microsoft Azure RSA TLS Issuing CA {index:02d}", forger, now)
                                             for index in range(FORGED_DOCUMENTS)] + [genuine])]
    before = _unpinned_issuer_samples()
    for ca, leaf in documents:
        content = pki.attested_content(nonce="forged", vm_id="00000000-0000-0000-0000-000000000001",
                                       subscription_id="00000000-0000-0000-0000-000000000002", sku="sku",
                                       plan=("", "", ""), license_type="", created_on=now, expires_on=now)
        with pytest.raises(UntrustedChain):
            holder.verify(pki.sign_attested(content, signer=leaf, extra_certificates=[ca.certificate]),
                          policy=VerificationPolicy(), now=now)
    after = _unpinned_issuer_samples()
    changed = {issuer: (before.get(issuer), value) for issuer, value in after.items() if value != before.get(issuer)}
    assert set(changed) == {"unproven", "Alerts Rotation CA 02"}
    labels = 'namespace="attest-system",job="attest-attest-service",instance="10.0.0.1:8080"'
    series = [{"series": f'attest_unpinned_issuer_total{{{labels},issuer="{issuer}"}}',
               "values": f"{'_' if old is None else int(old)}x20 {int(new)}x40"}
              for issuer, (old, new) in changed.items()]
    quiet = [{"eval_time": at, "alertname": name, "exp_alerts": []}
             for at in ("21m", "50m") for name in ("AttestUnprovenIssuer", "AttestVerificationFailureRatio")]
    annotations = {name: text.replace("{{ $labels.issuer }}", "Alerts Rotation CA 02").replace(
        "{{ $value | humanize }}", "1") for name, text in alerts_of(source_rules())["AttestUnpinnedIssuer"][
        "annotations"].items()}
    paged = {"eval_time": "21m", "alertname": "AttestUnpinnedIssuer", "exp_alerts": [{"exp_labels": {
        "severity": "critical", "namespace": "attest-system", "job": "attest-attest-service",
        "issuer": "Alerts Rotation CA 02"}, "exp_annotations": annotations}]}
    tests = {"rule_files": [str(RULES_FILE)], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [paged, *quiet]}]}
    (tmp_path / "forged_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    passed(promtool("test", "rules", tmp_path / "forged_test.yaml"))
