"""A local stand-in for the Azure Instance Metadata Service (IMDS), for vendors' tests and demos.

It serves the three routes a vendor's VM code touches and keeps the rules real IMDS enforces (from the
IMDS documentation, "Azure Instance Metadata Service" and "Attested data"):

- every request must carry ``Metadata: true`` and must not carry ``X-Forwarded-For`` (400), so that
  IMDS cannot be reached through a proxy or by server-side request forgery;
- ``api-version`` is required (except on ``/metadata/versions``); missing or unknown, the answer is 400
  with the ``newest-versions`` list;
- a query parameter given twice is refused (400);
- more than 5 requests per second are throttled with 429;
- ``/metadata/attested/document`` signs the VM's identity and the caller's ``nonce`` (default: the
  expiry instant as ``YYYYMMDD-HHMMSS``); ``/metadata/instance`` supports route-parameter filtering
  (``/metadata/instance/compute/vmId``) and ``format=text`` on leaves only.

Faults can be injected to exercise a client's retries: ``410`` (IMDS answers 410 Gone while it starts),
``500`` (transient server errors) and ``cached-nonce`` (IMDS hands back a cached document signed over an
older nonce). The signing PKI is generated fresh at start; its root and issuing CA are written to
``<pki_dir>/<cloud>/roots`` and ``.../intermediates``, the layout ``ATTEST_PINNED_CERTS`` reads.
"""

from __future__ import annotations

import base64
import collections
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from flask import Flask, Response, request
from werkzeug.serving import LISTEN_QUEUE, BaseWSGIServer, get_sockaddr, make_server, select_address_family

from attest_service.clouds import CloudProfile, cloud_by_name
from attest_service.errors import ConfigurationError
from attest_service.imds import pki
from attest_service.imds.faults import FAULT_KINDS, Fault, FaultKind

#: API versions IMDS accepts, oldest first (IMDS documentation, "Supported API versions").
API_VERSIONS: Final = (
    "2017-03-01", "2017-04-02", "2017-08-01", "2017-10-01", "2017-12-01", "2018-02-01", "2018-04-02",
    "2018-10-01", "2019-02-01", "2019-03-11", "2019-04-30", "2019-06-01", "2019-06-04", "2019-08-01",
    "2019-08-15", "2019-11-01", "2020-06-01", "2020-07-15", "2020-09-01", "2020-10-01", "2020-12-01",
    "2021-01-01", "2021-02-01", "2021-03-01", "2021-05-01", "2021-08-01", "2021-10-01", "2021-11-01",
    "2021-11-15", "2021-12-13", "2023-07-01", "2023-11-15", "2024-03-15",
)  # fmt: skip

#: How many of the newest versions a 400 lists, as IMDS does.
NEWEST_VERSIONS_LISTED: Final = 3

#: The first API version that serves ``/metadata/attested/document``.
FIRST_ATTESTED_VERSION: Final = "2018-10-01"

#: IMDS throttles a VM past this many requests per second (IMDS documentation, "Rate limiting").
DEFAULT_MAX_REQUESTS_PER_SECOND: Final = 5

#: Width of the rate-limit window, in seconds.
RATE_WINDOW_SECONDS: Final = 1.0

#: Longest nonce IMDS signs, in characters; the service's challenges fit in it.
MAX_NONCE_CHARS: Final = 32

#: How often the background server checks for a stop request, in seconds (bounds how long stop() takes).
SHUTDOWN_POLL_SECONDS: Final = 0.05

#: The instance metadata served when no instance file is given: a Marketplace VM in eastus.
DEFAULT_INSTANCE: Final[Mapping[str, object]] = {
    "compute": {
        "azEnvironment": "AzurePublicCloud",
        "licenseType": "",
        "location": "eastus",
        "name": "emulated-vm",
        "offer": "emulated-offer",
        "osType": "Linux",
        "plan": {"name": "standard", "product": "emulated-offer", "publisher": "emulated-publisher"},
        "publisher": "emulated-publisher",
        "resourceGroupName": "emulated-rg",
        "sku": "standard",
        "subscriptionId": "00000000-0000-4000-8000-000000000001",
        "tags": "",
        "tagsList": [],
        "vmId": "00000000-0000-4000-8000-000000000002",
        "vmSize": "Standard_D2s_v5",
        "zone": "",
    },
    "network": {
        "interface": [
            {
                "ipv4": {
                    "ipAddress": [{"privateIpAddress": "10.0.0.4", "publicIpAddress": ""}],
                    "subnet": [{"address": "10.0.0.0", "prefix": "24"}],
                },
                "ipv6": {"ipAddress": []},
                "macAddress": "000D3A000001",
            }
        ]
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorSettings:
    """What the emulator serves: which cloud it impersonates, the VM's metadata, the faults to inject."""

    cloud: CloudProfile = field(default_factory=CloudProfile.public)
    instance: Mapping[str, object] = field(default_factory=lambda: DEFAULT_INSTANCE)
    faults: Sequence[Fault] = ()
    max_requests_per_second: int = DEFAULT_MAX_REQUESTS_PER_SECOND

    def __post_init__(self) -> None:
        """Validate once: the instance metadata must have the fields a document signs."""
        compute = self.instance.get("compute")
        if not isinstance(compute, Mapping):
            raise ConfigurationError("instance metadata needs a 'compute' object")
        for key in ("vmId", "subscriptionId", "sku", "licenseType", "location"):
            if not isinstance(compute.get(key), str):
                raise ConfigurationError(f"instance metadata needs a string 'compute.{key}'")
        plan = compute.get("plan")
        if not isinstance(plan, Mapping) or not all(
            isinstance(plan.get(key), str) for key in ("name", "product", "publisher")
        ):
            raise ConfigurationError("instance metadata needs 'compute.plan' with name, product, publisher")
        if self.max_requests_per_second < 1:
            raise ConfigurationError("the request rate limit must be at least 1 per second")

    @property
    def compute(self) -> Mapping[str, object]:
        """The ``compute`` section (validated to be a mapping)."""
        compute = self.instance["compute"]
        assert isinstance(compute, Mapping)  # noqa: S101 - validated in __post_init__
        return compute

    def compute_str(self, key: str) -> str:
        """A string field of ``compute`` (validated in ``__post_init__``)."""
        return str(self.compute[key])

    def plan(self) -> tuple[str, str, str]:
        """The plan as ``(name, product, publisher)``."""
        plan = self.compute["plan"]
        assert isinstance(plan, Mapping)  # noqa: S101 - validated in __post_init__
        return str(plan["name"]), str(plan["product"]), str(plan["publisher"])


def _reason(exc: OSError) -> str:
    """An operating-system error as a phrase ("address already in use"), without Python's ``[Errno N]``."""
    return exc.strerror[:1].lower() + exc.strerror[1:] if exc.strerror else "an operating-system error"


def load_instance_file(path: Path) -> dict[str, object]:
    """Read instance metadata from a JSON file; raise :class:`ConfigurationError` when unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read instance metadata from {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"instance metadata in {path} must be a JSON object")
    return data


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorPki:
    """The emulator's signing material: the root and issuing CA vendors pin, and the signing leaf."""

    root: pki.CertifiedKey
    issuing_ca: pki.CertifiedKey
    leaf: pki.CertifiedKey

    @classmethod
    def generate(cls, settings: EmulatorSettings, now: datetime) -> EmulatorPki:
        """A fresh Azure-shaped PKI for the settings' cloud and the VM's region."""
        root, issuing_ca, leaf = pki.generate_pki(
            cloud_domain=settings.cloud.domain, region=settings.compute_str("location"), now=now
        )
        return cls(root=root, issuing_ca=issuing_ca, leaf=leaf)

    def write(self, directory: Path, cloud: CloudProfile) -> None:
        """Pin the root and issuing CA under ``directory/<cloud>/``."""
        pki.write_pinned_dir(
            directory, cloud.name, root=self.root.certificate, intermediates=[self.issuing_ca.certificate]
        )


class _State:
    """Mutable per-process state behind a lock: rate window, fault counters, the cached document."""

    def __init__(self, faults: Sequence[Fault]) -> None:
        self.lock = threading.Lock()
        self.recent: collections.deque[float] = collections.deque()
        self.remaining: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        for fault in faults:
            self.remaining[fault.kind] += fault.count
        self.cached_document: str | None = None

    def throttled(self, now: float, limit: int) -> bool:
        with self.lock:
            while self.recent and now - self.recent[0] >= RATE_WINDOW_SECONDS:
                self.recent.popleft()
            if len(self.recent) >= limit:
                return True
            self.recent.append(now)
            return False

    def take(self, kind: FaultKind) -> bool:
        with self.lock:
            if self.remaining[kind] > 0:
                self.remaining[kind] -= 1
                return True
            return False


def _json(payload: object, status: int) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Response(body, status=status, content_type="application/json; charset=utf-8")


def _bad_request(message: str, *, with_versions: bool = False) -> Response:
    payload: dict[str, object] = {"error": f"Bad request. {message}"}
    if with_versions:
        payload["newest-versions"] = list(reversed(API_VERSIONS[-NEWEST_VERSIONS_LISTED:]))
    return _json(payload, 400)


def _select(instance: object, path: str) -> tuple[bool, object]:
    """Walk ``path`` (``compute/vmId``, ``network/interface/0/...``) into the instance metadata."""
    node = instance
    for part in (p for p in path.split("/") if p):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _protocol_refusal() -> Response | None:
    """The protocol rules of the module docstring (headers, version, repeats): the 400 answer, or None."""
    # The headers: IMDS refuses anything that may have come through a proxy.
    if request.headers.get("Metadata", "").lower() != "true":
        return _bad_request("Required metadata header not specified")
    if "X-Forwarded-For" in request.headers:
        return _bad_request("Request contains the X-Forwarded-For header, which is not allowed")
    # Repeated parameters: one is ambiguous, so IMDS refuses it rather than pick one.
    for name in request.args:
        if len(request.args.getlist(name)) > 1:
            return _bad_request(f"Query parameter {name} is specified more than once")
    return _version_refusal()


def _version_refusal() -> Response | None:
    """The version rule: every route but the version list needs a known api-version."""
    if request.path.rstrip("/") == "/metadata/versions":
        return None
    version = request.args.get("api-version")
    if version is None:
        return _bad_request(
            "api-version was not specified in the request. For more information refer to aka.ms/azureimds",
            with_versions=True,
        )
    if version not in API_VERSIONS:
        return _bad_request("api-version is invalid or was not specified in the request", with_versions=True)
    return None


def create_app(
    settings: EmulatorSettings,
    signing: EmulatorPki,
    *,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    monotonic: Callable[[], float] = time.monotonic,
) -> Flask:
    """Build the emulator's WSGI application; ``clock`` and ``monotonic`` are injectable for tests."""
    app = Flask(__name__)
    state = _State(settings.faults)

    def sign_document(nonce: str | None, created_on: datetime) -> str:
        created_on = created_on.replace(microsecond=0)
        expires_on = created_on + pki.DOCUMENT_LIFETIME
        content = pki.attested_content(
            nonce=nonce if nonce is not None else pki.default_nonce(expires_on),
            vm_id=settings.compute_str("vmId"),
            subscription_id=settings.compute_str("subscriptionId"),
            sku=settings.compute_str("sku"),
            plan=settings.plan(),
            license_type=settings.compute_str("licenseType"),
            created_on=created_on,
            expires_on=expires_on,
        )
        return base64.b64encode(pki.sign_attested(content, signer=signing.leaf)).decode("ascii")

    @app.before_request
    def imds_rules() -> Response | None:
        # The rate rule first: IMDS counts every request against the VM's rate, even refused ones.
        if state.throttled(monotonic(), settings.max_requests_per_second):
            return _json({"error": "Too many requests"}, 429)
        refusal = _protocol_refusal()
        if refusal is not None:
            return refusal
        # Injected faults answer only requests IMDS itself would have served.
        if state.take("410"):
            return _json({"error": "Gone. The service is starting; retry later"}, 410)
        if state.take("500"):
            return _json({"error": "Internal server error"}, 500)
        return None

    @app.get("/metadata/versions")
    def versions() -> Response:
        return _json({"apiVersions": list(API_VERSIONS)}, 200)

    @app.get("/metadata/attested/document")
    def attested_document() -> Response:
        if request.args["api-version"] < FIRST_ATTESTED_VERSION:
            return _bad_request("api-version is invalid or was not specified in the request",
                                with_versions=True)  # fmt: skip
        nonce = request.args.get("nonce")
        if nonce is not None and not (0 < len(nonce) <= MAX_NONCE_CHARS and nonce.isprintable()):
            return _bad_request(f"nonce must be 1 to {MAX_NONCE_CHARS} printable characters")
        if state.take("cached-nonce"):
            # IMDS caches a signed document for a while and may hand it back whatever nonce is asked
            # for; the cache holds the document made for the first such request, without a nonce.
            with state.lock:
                if state.cached_document is None:
                    state.cached_document = sign_document(None, clock())
                signature = state.cached_document
        else:
            signature = sign_document(nonce, clock())
        return _json({"encoding": "pkcs7", "signature": signature}, 200)

    @app.get("/metadata/instance")
    @app.get("/metadata/instance/<path:route>")
    def instance(route: str = "") -> Response:
        found, node = _select(settings.instance, route)
        if not found:
            return _json({"error": "Not found"}, 404)
        output = request.args.get("format", "json")
        if output == "json":
            return _json(node, 200)
        if output != "text":
            return _bad_request(f"format {output!r} is not supported")
        if isinstance(node, Mapping | list):
            return _bad_request("Query parameter format=text is only supported for leaf nodes")
        text = node if isinstance(node, str) else json.dumps(node)
        return Response(text, status=200, content_type="text/plain; charset=utf-8")

    @app.errorhandler(404)
    def not_found(_error: Exception) -> Response:
        return _json({"error": "Not found"}, 404)

    @app.errorhandler(405)
    def not_allowed(_error: Exception) -> Response:
        return _json({"error": "Method not allowed"}, 405)

    return app


class RunningEmulator:
    """The emulator served by a threaded WSGI server in a background thread; a context manager.

    Binding to port 0 picks a free port; :attr:`url` says which.
    """

    def __init__(self, app: Flask, *, host: str, port: int, listener: socket.socket | None = None) -> None:
        """Serve on ``listener`` (by default one bound by :func:`listen`, raising OSError) on :meth:`start`."""
        if listener is None:
            listener = listen(host, port)
        try:
            # werkzeug serves a duplicate of the descriptor, so the listener given here is closed either way.
            self._server: BaseWSGIServer = make_server(host, port, app, threaded=True, fd=listener.fileno())
        finally:
            listener.close()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="imds-emulator",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:40123``."""
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode("ascii")
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"http://{shown}:{port}"

    def start(self) -> RunningEmulator:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def __enter__(self) -> RunningEmulator:
        """Start serving."""
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        """Stop serving."""
        self.stop()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``; raises :class:`OSError` when the address is taken or unusable.

    Bound here rather than by werkzeug, which answers a failed bind by printing its own message and exiting.
    """
    family = select_address_family(host, port)
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As werkzeug's own servers do: a restarted emulator need not wait for its old connections to time out.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(get_sockaddr(host, port, family))
        listener.listen(LISTEN_QUEUE)
    except BaseException:
        listener.close()
        raise
    return listener


def parse_bind(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` binds loopback); raise ConfigurationError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigurationError(f"--bind expects HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def start_emulator(
    settings: EmulatorSettings, *, pki_dir: Path, host: str = "127.0.0.1", port: int = 0
) -> tuple[RunningEmulator, EmulatorPki]:
    """Bind, generate the PKI, pin it under ``pki_dir``, and return the (not yet started) server.

    Bound first: an emulator that cannot listen must not replace the pins of one that already does.
    """
    try:
        listener = listen(host, port)
    except OSError as exc:
        shown = f"[{host}]" if ":" in host else host
        raise ConfigurationError(f"cannot listen on {shown}:{port}: {_reason(exc)}") from exc
    try:
        signing = EmulatorPki.generate(settings, datetime.now(UTC))
        try:
            signing.write(pki_dir, settings.cloud)
        except OSError as exc:
            raise ConfigurationError(f"cannot write the emulator's certificates under {pki_dir}: "
                                     f"{_reason(exc)}") from exc
        app = create_app(settings, signing)
    except BaseException:
        listener.close()
        raise
    return RunningEmulator(app, host=host, port=port, listener=listener), signing


def settings_for(cloud: str, instance_file: Path | None, faults: Sequence[str]) -> EmulatorSettings:
    """Build settings from command-line values; raise :class:`ConfigurationError` on a bad one."""
    instance = load_instance_file(instance_file) if instance_file is not None else DEFAULT_INSTANCE
    return EmulatorSettings(cloud=cloud_by_name(cloud), instance=instance, faults=tuple(Fault.parse(f) for f in faults))
