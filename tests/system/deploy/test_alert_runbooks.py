"""Each shipped alert points at its runbook: a section of docs/OPERATIONS.md that exists.

OPERATIONS.md holds one list of alerts (the shipped ones, each a row with an anchor); the alert's
``runbook_url`` annotation names that anchor, and the chart prefixes it with ``prometheusRule.runbookBaseUrl``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import yaml

from .common import CHART_DIR, REPO_ROOT, one

Render = Callable[..., list[dict[str, Any]]]

OPERATIONS: Final = REPO_ROOT / "docs" / "OPERATIONS.md"


def _alerts() -> dict[str, dict[str, Any]]:
    source = yaml.safe_load((CHART_DIR / "files" / "alerts.yaml").read_text(encoding="utf-8"))
    return {rule["alert"]: rule for group in source["groups"] for rule in group["rules"]}


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', OPERATIONS.read_text(encoding="utf-8")))


def test_every_alert_names_an_anchor_of_operations_md() -> None:
    anchors = _anchors()
    for name, rule in _alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/OPERATIONS.md#{name.lower()}", name
        assert url.split("#", 1)[1] in anchors, f"{name}: OPERATIONS.md has no anchor {url}"


def test_operations_md_lists_the_alerts_once() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    assert "Suggested alerts" not in text
    for name in _alerts():
        assert text.count(f'<a id="{name.lower()}"></a>') == 1, name


def test_the_chart_makes_each_runbook_url_a_link(render: Render) -> None:
    values = {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://git.example.com/attest/blob/v1/"}}
    [group] = one(render(values=values), "PrometheusRule")["spec"]["groups"]
    urls = {rule["alert"]: rule["annotations"]["runbook_url"] for rule in group["rules"]}
    assert urls == {name: f"https://git.example.com/attest/blob/v1/docs/OPERATIONS.md#{name.lower()}"
                    for name in _alerts()}
    # Without a base, the annotation names the file and section as the rule file has it.
    [group] = one(render(values={"prometheusRule": {"enabled": True}}), "PrometheusRule")["spec"]["groups"]
    assert {rule["annotations"]["runbook_url"] for rule in group["rules"]} == {
        rule["annotations"]["runbook_url"] for rule in _alerts().values()}
