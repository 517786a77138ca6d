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


def _main_values_rows() -> list[list[str]]:
    text = DEPLOYMENT.read_text(encoding="utf-8")
    table = text.split("Main values:\n\n", 1)[1].split("\n\n", 1)[0]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in table.splitlines()[2:]]


def _quoted_defaults() -> dict[str, str]:
    """DEPLOYMENT.md's "Main values": value path -> its default as quoted, for each default given as a value.

    A row may name several values, ``a.b`` / ``c``: the later ones are siblings of the first (``a.c``), and the
    defaults are given in the same order. Defaults in words (``off``, ``contract defaults``, ``appVersion``)
    and wildcard rows (``autoscaling.*``) are left out; ``empty`` is an empty string, list or map (one
    ``empty`` for a row of several values: each of them).
    """
    quoted = {}
    for cells in _main_values_rows():
        keys = [key.strip().strip("`") for key in cells[0].split(" / ")]
        defaults = [default.strip() for default in cells[1].split(" / ")]
        if defaults == ["empty"]:
            defaults *= len(keys)  # "empty" for a row of several values: each of them
        if any("*" in key for key in keys) or len(keys) != len(defaults):
            continue
        prefix = keys[0].rpartition(".")[0]
        for index, (key, default) in enumerate(zip(keys, defaults, strict=True)):
            path = key if index == 0 or not prefix else f"{prefix}.{key}"
            if default == "empty" or re.fullmatch(r"`[^`]*`", default):
                quoted[path] = default
    return quoted


def test_the_main_values_table_quotes_the_charts_defaults() -> None:
    values = _values(CHART_DIR / "values.yaml")
    quoted = _quoted_defaults()
    assert len(quoted) >= 20, quoted
    wrong = {}
    for path, default in quoted.items():
        actual: Any = values
        for part in path.split("."):
            assert isinstance(actual, dict), path
            assert part in actual, f"DEPLOYMENT.md names {path}, values.yaml has no such key"
            actual = actual[part]
        if default == "empty":
            if actual not in ("", [], {}, None):
                wrong[path] = (default, actual)
        elif yaml.safe_load(default.strip("`")) != actual:
            wrong[path] = (default, actual)
    assert wrong == {}, "DEPLOYMENT.md's default differs from values.yaml"
