"""The attestation step claims a caller-chosen nonce for the VM that signed the document (its ``vmId``).

Two tenants' VMs that chose the same nonce (IMDS's default nonce is a timestamp, so VMs attesting in the same
second do) are both accepted; each document is still accepted once, by whoever presents it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attest_service import Attestor, CallerPolicy, NonceReplayed, Verifier, open_store
from attest_service.imds import pki
from tests.support import tools
from tests.support.redis_server import RedisServer, redis_server

VM_A = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
VM_B = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"
TIMESTAMP_NONCE = "20250101-101010"


class Signer:
    """A pinned Azure-shaped PKI, signing documents of any VM now."""

    def __init__(self, pins: Path) -> None:
        self.now = datetime.now(UTC)
        root, issuing, self.leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=self.now)
        pki.write_pinned_dir(pins, "public", root=root.certificate, intermediates=[issuing.certificate])
        self.pins = pins

    def response(self, *, vm: str, nonce: str, age: timedelta = timedelta(0)) -> dict[str, str]:
        created = self.now - age
        content = pki.attested_content(nonce=nonce, vm_id=vm, subscription_id="s", sku="", plan=("", "", ""),
                                       license_type="", created_on=created, expires_on=created + timedelta(hours=6))
        signature = pki.sign_attested(content, signer=self.leaf)
        return {"encoding": "pkcs7", "signature": base64.b64encode(signature).decode()}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    tools.require("redis-server", "redis-cli")
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=[pytest.mark.slow, tools.requires_redis])])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nonces.sqlite3'}"
    server: RedisServer = request.getfixturevalue("redis")
    client = server.client()
    client.flushall()
    client.close()
    return server.url


def test_two_tenants_vms_with_one_nonce_are_both_accepted_once(store_url: str, tmp_path: Path) -> None:
    signer = Signer(tmp_path / "pins")
    store = open_store(store_url)
    try:
        attestor = Attestor(Verifier.from_directory(signer.pins), store)
        tenant_a, tenant_b = CallerPolicy(client_id="tenant-a"), CallerPolicy(client_id="tenant-b")
        # Tenant A presents its VM's document first; tenant B's VM, with the same nonce, is not blocked.
        of_a = signer.response(vm=VM_A, nonce=TIMESTAMP_NONCE)
        of_b = signer.response(vm=VM_B, nonce=TIMESTAMP_NONCE)
        assert attestor.attest(of_a, at=signer.now, caller=tenant_a).challenge is False
        assert attestor.attest(of_b, at=signer.now, caller=tenant_b).challenge is False
        # Each document again, by either tenant, and a fresh document of a VM over its used nonce: replays.
        for response in (of_a, of_b, signer.response(vm=VM_B, nonce=TIMESTAMP_NONCE, age=timedelta(seconds=5))):
            for caller in (tenant_a, tenant_b):
                with pytest.raises(NonceReplayed):
                    attestor.attest(response, at=signer.now, caller=caller)
    finally:
        store.close()


def test_a_challenge_is_consumed_once_whichever_vm_presents_it(store_url: str, tmp_path: Path) -> None:
    signer = Signer(tmp_path / "pins")
    store = open_store(store_url)
    try:
        attestor = Attestor(Verifier.from_directory(signer.pins), store)
        caller = CallerPolicy(client_id="fleet", require_challenge=True)
        challenge = attestor.issue_challenge(client_id="fleet", at=signer.now)
        first = attestor.attest(signer.response(vm=VM_A, nonce=challenge.nonce), at=signer.now, caller=caller)
        assert first.challenge is True
        with pytest.raises(NonceReplayed):
            attestor.attest(signer.response(vm=VM_B, nonce=challenge.nonce), at=signer.now, caller=caller)
    finally:
        store.close()
