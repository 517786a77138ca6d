"""The Grafana dashboard of the chart, tested as code.

- The JSON is a dashboard Grafana can import: unique panel ids, every query on the data source variable.
- The chart ships it, unchanged, in a ConfigMap labelled for Grafana's dashboard sidecar, only when asked.
- Every panel's query (and every template variable's) answers something when run by the real promtool over
  the series a real running service exports: the service is driven through what the panels show (verified,
  refused, revoked and replayed documents, results issued, a CRL, an unpinned issuer, the AIA fallback, a
  fingerprint pin, 401 and 429 answers, a nonce store outage), its ``/metrics`` is scraped, and each scraped
  series becomes synthetic input of ``promtool test rules``. A query naming a metric or a label value the
  service does not export answers nothing, and fails.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from attest_service.imds import pki
from attest_service.results.keys import write_new_key
from tests.support import crls, tools
from tests.support.redis_server import redis_server
from tests.support.service import DocumentFactory, api_keys_env, running_service

from .common import CHART_DIR, NAMESPACE, by_kind

Render = Callable[..., list[dict[str, Any]]]
Promtool = Callable[..., subprocess.CompletedProcess[str]]

DASHBOARD_FILE = CHART_DIR / "files" / "dashboard.json"
#: What Grafana puts in place of the dashboard's variables, for promtool: every namespace and job.
VARIABLES = {"$namespace": ".*", "$job": ".*", "$__rate_interval": "2m", "${datasource}": ""}
#: The labels Prometheus adds to every scraped series (what the dashboard's variables select on).
TARGET_LABELS = {"namespace": NAMESPACE, "job": "attest-attest-service"}
#: Samples of each synthetic series, one a minute; queries are evaluated at :data:`EVAL_MINUTES`.
SAMPLES = 30
EVAL_MINUTES = 20
PROMTOOL_TIMEOUT_SECONDS = 60
#: Requests a minute each API key may make: the flooding client passes it, the other one stays under it.
RATE_LIMIT = 7


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return dashboard


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target and every query variable, variables substituted."""
    found = [(f"panel {panel['title']!r} target {target['refId']}", target["expr"])
             for panel in _panels(dashboard) for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label): the variable lists values only while SELECTOR has series.
            match = re.fullmatch(r"label_values\((.+),\s*[a-zA-Z_]+\)", variable["query"]["query"])
            assert match is not None, variable
            found.append((f"variable {variable['name']}", match.group(1)))
    substituted = []
    for where, query in found:
        expr = query
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        substituted.append((where, expr))
    return substituted


# --- the JSON and the chart ---------------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = _dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("attest-service", "attest-service")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        assert all(target["datasource"] == panel["datasource"] for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = {panel["title"] for panel in _panels(dashboard)}
    # What an operator looks for (the chart's documentation names these panels).
    assert {"Verifications by result", "Refusals and errors by code", "Verification latency",
            "Nonce store availability", "Rate-limited and throttled callers", "Pinned certificates by days left",
            "Unpinned issuers"} <= titles


def test_chart_ships_the_dashboard_for_the_grafana_sidecar_when_enabled(render: Render) -> None:
    assert not [m for m in by_kind(render(), "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
    manifests = render(values={"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Attestation"},
                                                    "labels": {"team": "licensing"}}})
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-dashboard"))
    labels = configmap["metadata"]["labels"]
    assert (labels["grafana_dashboard"], labels["team"]) == ("1", "licensing")
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Attestation"}
    assert json.loads(configmap["data"]["attest-service.json"]) == _dashboard()
    # Another sidecar label, and the namespace Grafana watches.
    manifests = render(values={"grafanaDashboard": {"enabled": True, "label": "dashboards.example.com/grafana",
                                                    "labelValue": "attest", "namespace": "monitoring"}})
    configmap = next(m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-dashboard"))
    assert configmap["metadata"]["labels"]["dashboards.example.com/grafana"] == "attest"
    assert configmap["metadata"]["namespace"] == "monitoring"


# --- every query against what a running service exports -----------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> Promtool:
    """Run the real promtool (Debian's prometheus package, which `make test` installs when it is missing)."""
    binary = tools.require("promtool")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                              timeout=PROMTOOL_TIMEOUT_SECONDS, check=False)

    return run


def _scrape(host: str, port: int) -> str:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200, body
    return body


def _pki_with_a_revoked_signer(pinned: Path) -> tuple[DocumentFactory, DocumentFactory]:
    """A pinned PKI whose issuing CA's CRL (in ``crls/``) revokes a second signer: (good, revoked) factories."""
    now = datetime.now(UTC)
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=now)
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    revoked = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                            common_name="metadata.azure.com", key=pki.new_key("rsa"), issuer=issuing,
                            not_before=now - timedelta(days=1), not_after=now + timedelta(days=30),
                            serial=x509.random_serial_number())
    (pinned / "public" / "crls").mkdir()
    (pinned / "public" / "crls" / "issuing.crl").write_bytes(
        crls.der(crls.make_crl(issuing, revoked=[revoked.certificate.serial_number], now=now)))
    return DocumentFactory(leaf=leaf, pinned_dir=pinned), DocumentFactory(leaf=revoked, pinned_dir=pinned)


def _unpinned_signer() -> DocumentFactory:
    """Documents signed under an issuing CA that nothing pins (its own root, a name of its own)."""
    now = datetime.now(UTC)
    start = now - timedelta(days=1)
    root = pki.make_root(common_name="Stranger Root", key=pki.new_key("ec"), not_before=start,
                         not_after=now + timedelta(days=30), serial=x509.random_serial_number())
    issuing = pki.make_intermediate(common_name="Stranger Issuing CA", key=pki.new_key("ec"), issuer=root,
                                    not_before=start, not_after=now + timedelta(days=30),
                                    serial=x509.random_serial_number())
    leaf = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                         common_name="metadata.azure.com", key=pki.new_key("rsa"), issuer=issuing,
                         not_before=start, not_after=now + timedelta(days=30), serial=x509.random_serial_number())
    return DocumentFactory(leaf=leaf, pinned_dir=Path("/nonexistent"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ``/metrics`` text of a real service (gunicorn, Redis store) driven through every panel's subject."""
    tools.require("redis-server", "redis-cli")
    workdir = tmp_path_factory.mktemp("dashboard-service")
    factory, revoked = _pki_with_a_revoked_signer(workdir / "pinned")
    # A CA pinned by fingerprint without a URL: reported (not fetched, no_url), and nothing leaves the host.
    (factory.pinned_dir / "public" / "intermediates" / "fingerprints.txt").write_text(
        f"{'ab' * 32}  -  # Ops Staged Issuing CA\n", encoding="utf-8")
    stranger = _unpinned_signer()
    keys = {"ops": "o" * 43, "flood": "f" * 43}
    # A shared store issues no attestation results unless given keys.
    write_new_key(workdir / "result-keys")
    with redis_server(workdir / "redis") as redis:
        env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": redis.url,
               "ATTEST_API_KEYS": api_keys_env(keys), "ATTEST_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
               "ATTEST_AIA_FETCH": "1", "ATTEST_FINGERPRINT_FETCH": "1",
               "ATTEST_RESULT_KEYS": str(workdir / "result-keys")}
        with running_service(env, workdir, workers=1) as service:
            challenge = service.post("/v1/challenges", key=keys["ops"])
            assert challenge.status == 201, challenge.body
            body = factory.verify_body(str(challenge.body["nonce"]))
            assert service.post("/v1/verify", body, key=keys["ops"]).status == 200
            assert service.post("/v1/verify", body, key=keys["ops"]).code == "nonce_replayed"
            refused = service.post("/v1/verify", revoked.verify_body("caller-nonce-2"), key=keys["ops"])
            assert refused.code == "certificate_revoked", refused.body
            unpinned = service.post("/v1/verify", stranger.verify_body("caller-nonce-1"), key=keys["ops"])
            assert unpinned.code == "untrusted_chain", unpinned.body
            assert service.post("/v1/verify", body).status == 401
            codes = [service.post("/v1/verify", factory.verify_body(f"flood-{n}"), key=keys["flood"]).code
                     for n in range(RATE_LIMIT + 2)]
            assert "rate_limited" in codes, codes
            redis.stop()
            outage = service.post("/v1/verify", factory.verify_body("during-outage"), key=keys["ops"])
            assert outage.code == "store_unavailable", outage.body
            assert service.get("/readyz").status == 503
            yield _scrape(service.host, service.port)


def _series(exposition: str) -> list[dict[str, str]]:
    """Every scraped sample as a promtool input series: the scrape's labels added, counters growing."""
    series = []
    for family in text_string_to_metric_families(exposition):
        growing = family.type in ("counter", "histogram", "summary")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = {**sample.labels, **TARGET_LABELS}
            selector = ",".join(f"{name}={json.dumps(value)}" for name, value in sorted(labels.items()))
            value = f"{sample.value:.6f}"
            # A counter that moved grows by its scraped value each minute; every other sample stays as scraped.
            values = f"0+{value}x{SAMPLES}" if growing else f"{value}+0x{SAMPLES}"
            series.append({"series": f"{sample.name}{{{selector}}}", "values": values})
    return series


def _run_queries(promtool: Promtool, directory: Path, series: list[dict[str, str]],
                 queries: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
    """promtool's verdict on whether each query answers at least one series over ``series``."""
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [{"expr": f"count({expr}) > bool 0", "eval_time": f"{EVAL_MINUTES}m",
                              "exp_samples": [{"labels": "{}", "value": 1}]} for _, expr in queries]}]}
    path = directory / "dashboard_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    return promtool("test", "rules", path)


def test_every_panel_query_answers_over_the_series_the_service_exports(exported: str, promtool: Promtool,
                                                                       tmp_path: Path) -> None:
    series = _series(exported)
    queries = _queries(_dashboard())
    result = _run_queries(promtool, tmp_path, series, queries)
    assert result.returncode == 0, "\n".join([result.stdout, result.stderr,
                                              *(f"{where}: {expr}" for where, expr in queries)])


def test_a_query_naming_a_metric_the_service_does_not_export_fails(exported: str, promtool: Promtool,
                                                                   tmp_path: Path) -> None:
    # The check itself can fail: a renamed metric, or a label value the service never sets, answers nothing.
    series = _series(exported)
    for expr in ("sum(rate(attest_verification_total[2m]))",
                 'sum(rate(attest_verifications_total{code="no_such_code"}[2m]))'):
        result = _run_queries(promtool, tmp_path, series, [("renamed", expr)])
        assert result.returncode != 0, expr
        assert "got: nil" in result.stdout + result.stderr, result.stdout + result.stderr
