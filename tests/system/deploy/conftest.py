"""Fixtures for the deployment tests: a real helm binary and a function rendering the chart."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import tools

from .common import CHART_DIR, GET_HELM, GET_HELM_TIMEOUT_SECONDS, HELM_TIMEOUT_SECONDS, NAMESPACE, RELEASE, HelmFailed


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Run the real helm binary (from .ci/get-helm.sh, or $ATTEST_HELM) with isolated config/cache dirs.

    The returned callable takes helm's arguments and returns its standard output, raising HelmFailed
    (with helm's standard error) on a non-zero exit.
    """
    binary = os.environ.get("ATTEST_HELM")
    if not binary:
        fetched = subprocess.run(
            ["bash", str(GET_HELM)],
            env={**os.environ, "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=GET_HELM_TIMEOUT_SECONDS, check=False,
        )
        if fetched.returncode != 0:
            tools.missing(f"helm could not be fetched (.ci/get-helm.sh exited {fetched.returncode}):\n{fetched.stderr}")
        binary = fetched.stdout.strip().splitlines()[-1]
    home = tmp_path_factory.mktemp("helm-home")
    # helm would otherwise read and write the developer's ~/.config/helm and ~/.cache/helm.
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> str:
        result = subprocess.run(
            [binary, *args], env=env, capture_output=True, text=True,
            timeout=HELM_TIMEOUT_SECONDS, check=False,
        )
        if result.returncode != 0:
            raise HelmFailed(result.stderr)
        return result.stdout

    return run


@pytest.fixture(scope="session")
def render(helm: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[dict[str, Any]]]:
    """Render the chart with value files and/or a values mapping; return the manifests as dicts."""
    values_dir = tmp_path_factory.mktemp("values")

    def run(*value_files: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        args = ["template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE]
        for path in value_files:
            args += ["--values", str(path)]
        if values is not None:
            # A values file, not --set, so the test controls the YAML types exactly.
            extra = values_dir / f"values-{len(list(values_dir.iterdir()))}.yaml"
            extra.write_text(yaml.safe_dump(values), encoding="utf-8")
            args += ["--values", str(extra)]
        return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]

    return run
