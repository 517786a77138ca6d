"""A minimal Kubernetes API server in memory, for helm's install and upgrade to run against.

No kube-apiserver can run on a developer's machine or in CI here, and ``helm template`` never contacts one, so
the chart's ``lookup`` (how a generated key survives ``helm upgrade``) would go untested. This answers what
helm 3 asks of a cluster: version and discovery, and create, get, list (by equality label selectors),
replace, merge-patch and delete of namespaced objects, kept as JSON. It validates nothing and schedules
nothing: a stand-in for the API's storage, not for Kubernetes.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: group/version -> (resource, kind) of what the chart renders, plus the release records (Secrets).
RESOURCES: dict[str, list[tuple[str, str]]] = {
    "v1": [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
           ("serviceaccounts", "ServiceAccount"), ("pods", "Pod"), ("persistentvolumeclaims", "PersistentVolumeClaim")],
    "apps/v1": [("deployments", "Deployment")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule")],
}


#: The kind of each resource name, for the kind of a list (client-go decodes a SecretList, not a List).
_KINDS: dict[str, str] = {name: kind for resources in RESOURCES.values() for name, kind in resources}


def _resource_list(group_version: str) -> dict[str, Any]:
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
        {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind,
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
        for name, kind in RESOURCES[group_version]]}


def _discovery() -> dict[str, Any]:
    groups = [gv for gv in RESOURCES if "/" in gv]
    routes: dict[str, Any] = {
        "/version": {"major": "1", "minor": "26", "gitVersion": "v1.26.0", "platform": "linux/amd64"},
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
             "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in groups]},
        "/api/v1": _resource_list("v1"),
    }
    routes.update({f"/apis/{gv}": _resource_list(gv) for gv in groups})
    return routes


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (helm's strategic merge patches of these objects reduce to it here)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


class KubeApi:
    """The objects, by (collection path, name); and the server answering for them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.routes = _discovery()

    def get(self, namespace: str, resource: str, name: str) -> dict[str, Any] | None:
        """An object of the core group, as stored (for the test's own checks)."""
        return self.objects.get((f"/api/v1/namespaces/{namespace}/{resource}", name))


def _split(path: str) -> tuple[str, str | None]:
    """(collection path, item name or None) of a namespaced object path."""
    parts = path.rstrip("/").split("/")
    namespaced = "namespaces" in parts and len(parts) - parts.index("namespaces") >= 3
    if namespaced and len(parts) - parts.index("namespaces") == 4:
        return "/".join(parts[:-1]), parts[-1]
    return path.rstrip("/"), None


def _selected(item: dict[str, Any], selector: str) -> bool:
    labels = item.get("metadata", {}).get("labels", {}) or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _handler(api: KubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self) -> None:
            self._answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                               "code": 404, "message": "not found"})

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            loaded: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
            return loaded

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in api.routes:
                self._answer(200, api.routes[url.path])
                return
            collection, name = _split(url.path)
            with api.lock:
                if name is not None:
                    found = api.objects.get((collection, name))
                    if found is None:
                        self._not_found()
                    else:
                        self._answer(200, found)
                    return
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                items = [item for (where, _), item in api.objects.items() if where == collection
                         and _selected(item, selector)]
            self._answer(200, {"kind": f"{_KINDS.get(collection.rsplit('/', 1)[-1], '')}List", "apiVersion": "v1",
                               "metadata": {"resourceVersion": "1"}, "items": items})

        def do_POST(self) -> None:
            collection, _ = _split(urlsplit(self.path).path)
            body = self._body()
            metadata = body.setdefault("metadata", {})
            with api.lock:
                if (collection, metadata["name"]) in api.objects:
                    self._answer(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "reason": "AlreadyExists", "code": 409})
                    return
                metadata.update({"uid": str(uuid.uuid4()), "resourceVersion": "1",
                                 "creationTimestamp": "2026-01-01T00:00:00Z"})
                api.objects[(collection, metadata["name"])] = body
            self._answer(201, body)

        def do_PUT(self) -> None:
            collection, name = _split(urlsplit(self.path).path)
            body = self._body()
            with api.lock:
                api.objects[(collection, str(name))] = body
            self._answer(200, body)

        def do_PATCH(self) -> None:
            collection, name = _split(urlsplit(self.path).path)
            patch = self._body()
            with api.lock:
                current = api.objects.get((collection, str(name)))
                if current is None:
                    self._not_found()
                    return
                api.objects[(collection, str(name))] = _merge(current, patch)
                answer = api.objects[(collection, str(name))]
            self._answer(200, answer)

        def do_DELETE(self) -> None:
            collection, name = _split(urlsplit(self.path).path)
            with api.lock:
                gone = api.objects.pop((collection, str(name)), None)
            if gone is None:
                self._not_found()
            else:
                self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def kube_api() -> Iterator[tuple[KubeApi, str]]:
    """A running :class:`KubeApi` on a loopback port, and its URL."""
    api = KubeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
