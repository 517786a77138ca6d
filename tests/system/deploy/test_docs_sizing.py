"""One source of truth for sizing: docs/DEPLOYMENT.md quotes the chart's values files, figure for figure."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from .common import CHART_DIR, HA_VALUES, REPO_ROOT

DEPLOYMENT: Final = REPO_ROOT / "docs" / "DEPLOYMENT.md"


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key),
                                                                                          dict) else value
    return merged


def _values(path: Path) -> dict[str, Any]:
    defaults: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    if path == CHART_DIR / "values.yaml":
        return defaults
    return _merged(defaults, yaml.safe_load(path.read_text(encoding="utf-8")))


def _rows() -> dict[str, list[str]]:
    text = DEPLOYMENT.read_text(encoding="utf-8")
    table = text.split("<!-- chart-sizing -->\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {re.sub(r"[`]| \(.*\)", "", row[0]): row[1:] for row in rows}


def _expected(values: dict[str, Any]) -> list[str]:
    autoscaling, resources = values["autoscaling"], values["resources"]
    replicas = (f"{values['replicaCount']} ({autoscaling['minReplicas']}-{autoscaling['maxReplicas']})"
                if autoscaling["enabled"] else f"{values['replicaCount']} (HPA off)")
    target = str(autoscaling["targetCPUUtilizationPercentage"]) + ("" if autoscaling["enabled"] else " (when enabled)")
    return [replicas, str(values["server"]["workers"]),
            f"{resources['requests']['cpu']} / {resources['limits']['cpu']}",
            f"{resources['requests']['memory']} / {resources['limits']['memory']}", target]


@pytest.mark.parametrize("path", [CHART_DIR / "values.yaml", HA_VALUES], ids=["values.yaml", "values-ha.yaml"])
def test_deployment_md_quotes_the_values_file(path: Path) -> None:
    name = str(path.relative_to(REPO_ROOT))
    assert _rows()[name] == _expected(_values(path))


@pytest.mark.parametrize("path", [CHART_DIR / "values.yaml", HA_VALUES], ids=["values.yaml", "values-ha.yaml"])
def test_one_worker_per_core_of_the_cpu_limit(path: Path) -> None:
    values = _values(path)
    assert float(values["resources"]["limits"]["cpu"]) == values["server"]["workers"]


def test_the_sizing_is_no_longer_to_be_completed() -> None:
    assert "to be completed" not in DEPLOYMENT.read_text(encoding="utf-8")
