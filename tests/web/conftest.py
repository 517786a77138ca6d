"""Fixtures of the REST service tests: a generated Azure-shaped PKI, documents it signs, apps and stores."""

from __future__ import annotations

import base64
import hashlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from attest_service.imds import pki
from attest_service.nonces import NonceStore, open_store
from attest_service.settings import Settings
from attest_service.web import create_app
from tests.support import tools
from tests.support.redis_server import RedisServer, redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The instant the generated PKI is built around and the apps' clock shows (unless a test moves it).
NOW = datetime(2030, 3, 1, 12, 0, 0, tzinfo=UTC)

#: API keys of the test clients and their SHA-256 digests as ATTEST_API_KEYS wants them.
KEYS = {"license-server": "ls-secret-key-0001", "billing": "billing-secret-key-0002"}
API_KEYS_ENV = ",".join(f"{client}:{hashlib.sha256(key.encode()).hexdigest()}" for client, key in KEYS.items())

SUBSCRIPTION = "8a205152-0000-4000-8000-000000000001"
#: The VM documents are signed for unless a test names another: signed again over one nonce, a document is
#: the same VM's, a replay (caller-chosen nonces are claimed per VM).
VM_ID = "5d1e0a7c-0000-4000-8000-00000000b001"

_serials = itertools.count(1000)


def bearer(client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[client]}"}


@dataclass(frozen=True)
class GeneratedPki:
    """A pinned root and issuing CA, a leaf that signs like IMDS, and the pinned directory they live in."""

    root: pki.CertifiedKey
    issuing: pki.CertifiedKey
    leaf: pki.CertifiedKey
    pinned_dir: Path

    def content(self, *, nonce: str | None = None, created_on: datetime = NOW - timedelta(minutes=1),
                subscription: str = SUBSCRIPTION, sku: str = "20_04-lts-gen2",
                plan: tuple[str, str, str] = ("gold", "widget", "contoso"), license_type: str = "",
                vm_id: str = VM_ID) -> bytes:
        expires_on = created_on + pki.DOCUMENT_LIFETIME
        return pki.attested_content(
            nonce=nonce if nonce is not None else uuid.uuid4().hex[:20], vm_id=vm_id,
            subscription_id=subscription, sku=sku, plan=plan, license_type=license_type,
            created_on=created_on, expires_on=expires_on)

    def signature(self, *, signer: pki.CertifiedKey | None = None, **claims: object) -> str:
        """Base64 PKCS7 of a fresh document (a random nonce unless given)."""
        der = pki.sign_attested(self.content(**claims), signer=signer or self.leaf)  # type: ignore[arg-type]
        return base64.b64encode(der).decode()

    def document(self, **claims: object) -> dict[str, str]:
        """The IMDS response object of a fresh document."""
        return {"encoding": "pkcs7", "signature": self.signature(**claims)}

    def leaf_named(self, name: str) -> pki.CertifiedKey:
        return pki.make_leaf(dns_names=[name], common_name=name, key=self.leaf.private_key, issuer=self.issuing,
                             not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=30),
                             serial=next(_serials))


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> GeneratedPki:
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=NOW)
    pinned = tmp_path_factory.mktemp("pinned")
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    return GeneratedPki(root=root, issuing=issuing, leaf=leaf, pinned_dir=pinned)


@pytest.fixture(scope="module")
def live_pki(tmp_path_factory: pytest.TempPathFactory) -> GeneratedPki:
    """A PKI valid around the real clock, for tests that run the service as a process (no injected clock)."""
    root, issuing, leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=datetime.now(UTC))
    pinned = tmp_path_factory.mktemp("live-pinned")
    pki.write_pinned_dir(pinned, "public", root=root.certificate, intermediates=[issuing.certificate])
    return GeneratedPki(root=root, issuing=issuing, leaf=leaf, pinned_dir=pinned)


@pytest.fixture(scope="session")
def foreign_pki() -> tuple[pki.CertifiedKey, pki.CertifiedKey, pki.CertifiedKey]:
    """A PKI of the same shape that is not pinned."""
    return pki.generate_pki(cloud_domain="metadata.azure.com", now=NOW)


def settings_for(test_pki: GeneratedPki, store_url: str, **env: str) -> Settings:
    base = {"ATTEST_PINNED_CERTS": str(test_pki.pinned_dir), "ATTEST_NONCE_STORE": store_url}
    return Settings.from_env({**base, **env})


class Clock:
    """A settable clock for the app under test."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    tools.require("redis-server", "redis-cli")
    with redis_server() as server:
        yield server


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nonces.sqlite3'}"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=[pytest.mark.slow, tools.requires_redis])])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
    server: RedisServer = request.getfixturevalue("redis")
    if not server.running:
        server.start()
    client = server.client()
    client.flushall()
    client.close()
    return server.url


AppFactory = Callable[..., FlaskClient]


@pytest.fixture
def make_client(test_pki: GeneratedPki, tmp_path: Path) -> Iterator[AppFactory]:
    """Build a test client: ``make_client(store_url=None, clock=None, policy=None, **env)``.

    Without keys and without a policy the service is open (``ATTEST_ALLOW_OPEN=1``), as ``make run`` is on
    loopback, unless ``env`` sets ``ATTEST_ALLOW_OPEN`` itself. The application runs outside gunicorn, where
    nothing says it listens on loopback only, so without that setting it would take challenges only.
    """
    stores: list[NonceStore] = []

    def factory(*, store_url: str | None = None, clock: Callable[[], datetime] | None = None,
                policy: str | None = None, **env: str) -> FlaskClient:
        url = store_url or f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
        if policy is None and "ATTEST_API_KEYS" not in env:
            env.setdefault("ATTEST_ALLOW_OPEN", "1")
        if policy is not None:
            path = tmp_path / f"policy-{len(stores)}.toml"
            path.write_text(policy)
            env["ATTEST_POLICY_FILE"] = str(path)
        settings = settings_for(test_pki, url, **env)
        store = open_store(url, timeout_seconds=settings.store_timeout_seconds,
                           challenge_ttl_seconds=settings.challenge_ttl.total_seconds())
        stores.append(store)
        app: Flask = create_app(settings, store=store, clock=clock or Clock())
        return app.test_client()

    yield factory
    for store in stores:
        store.close()


@pytest.fixture
def client(make_client: AppFactory) -> FlaskClient:
    """An open service (no keys, no policy) over a SQLite store, at NOW."""
    return make_client()
