"""Seen records of caller-chosen nonces are scoped by the VM whose document carried them, on every backend.

The threat: nonces that VMs choose are often predictable (sequential, or IMDS's default, a timestamp), and
a tenant with a VM of its own could present its documents first and burn the nonces another tenant's VMs
will use. A document is signed by Azure for one VM (its ``vmId``), so a caller can only present documents of
its own VMs, or copies of documents it captured. Keyed by (nonce, VM), one VM's acceptance blocks nothing of
another VM, and a captured document is still refused to everyone, since it names the VM it was signed for.
A service-issued challenge stays one record for the nonce: it is consumed once, whichever VM presents it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from attest_service.errors import NonceReplayed
from attest_service.nonces import Acceptance, NonceStore
from attest_service.nonces.store import CLOCK_DISAGREEMENT_MARGIN_SECONDS

from .conftest import StoreFactory, utcnow

Unique = Callable[[str], str]
DOCUMENT_LIFETIME = timedelta(minutes=10)
VM_A = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
VM_B = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"


def accept(store: NonceStore, nonce: str, *, vm: str | None, client: str = "tenant",
           require_challenge: bool = False) -> Acceptance:
    now = utcnow()
    return store.accept(nonce, client_id=client, expires_at=now + DOCUMENT_LIFETIME,
                        require_challenge=require_challenge, now=now, scope=vm)


def test_one_vms_nonce_does_not_block_another_vms(store: NonceStore, unique: Unique) -> None:
    nonce = unique("20250101-101010")  # IMDS's default nonce is a timestamp: VMs of two tenants share it
    assert accept(store, nonce, vm=VM_A, client="tenant-a") == Acceptance(challenge=False)
    assert accept(store, nonce, vm=VM_B, client="tenant-b") == Acceptance(challenge=False)
    # Each VM's document is still accepted once, whoever presents it again.
    for vm in (VM_A, VM_B):
        for client in ("tenant-a", "tenant-b", "tenant-c"):
            with pytest.raises(NonceReplayed):
                accept(store, nonce, vm=vm, client=client)


def test_many_vms_on_one_nonce(store: NonceStore, unique: Unique) -> None:
    nonce = unique("shared")
    vms = [f"00000000-0000-4000-8000-{index:012d}" for index in range(12)]
    for vm in vms:
        assert accept(store, nonce, vm=vm) == Acceptance(challenge=False)
    for vm in vms:
        with pytest.raises(NonceReplayed):
            accept(store, nonce, vm=vm)


def test_a_consumed_challenge_is_refused_to_every_vm(store: NonceStore, unique: Unique) -> None:
    nonce, client = unique("challenge"), unique("client")
    store.issue_challenge(nonce, client_id=client, expires_at=utcnow() + timedelta(minutes=5))
    assert accept(store, nonce, vm=VM_A, client=client, require_challenge=True) == Acceptance(challenge=True)
    for vm in (VM_A, VM_B):
        for required in (True, False):
            with pytest.raises(NonceReplayed):
                accept(store, nonce, vm=vm, client=client, require_challenge=required)


def test_a_claim_without_a_scope_is_once_overall(store: NonceStore, unique: Unique) -> None:
    unscoped_first, scoped_first = unique("unscoped"), unique("scoped")
    assert accept(store, unscoped_first, vm=None) == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed):
        accept(store, unscoped_first, vm=VM_A)
    assert accept(store, scoped_first, vm=VM_A) == Acceptance(challenge=False)
    with pytest.raises(NonceReplayed):
        accept(store, scoped_first, vm=None)


def test_a_challenge_consumed_over_vm_records_keeps_those_vms_refused(store: NonceStore, unique: Unique) -> None:
    # A challenge equal to a nonce VMs already used (the service draws 144 random bits, so only by accident).
    nonce, client = unique("collision"), unique("client")
    assert accept(store, nonce, vm=VM_A, client=client) == Acceptance(challenge=False)
    store.issue_challenge(nonce, client_id=client, expires_at=utcnow() + timedelta(minutes=5))
    assert accept(store, nonce, vm=VM_B, client=client, require_challenge=True) == Acceptance(challenge=True)
    with pytest.raises(NonceReplayed):
        accept(store, nonce, vm=VM_A, client=client)


@pytest.mark.slow
def test_a_shorter_lived_vm_record_does_not_shorten_another(make_store: StoreFactory, unique: Unique) -> None:
    store = make_store(challenge_ttl_seconds=0.2)
    nonce = unique("lifetimes")
    now = utcnow()
    store.accept(nonce, client_id="c", expires_at=now + DOCUMENT_LIFETIME, require_challenge=False, now=now,
                 scope=VM_A)
    # VM B's document expired long ago: its record lives 200 ms (see the contract tests' forgotten record).
    expired = now - timedelta(seconds=CLOCK_DISAGREEMENT_MARGIN_SECONDS) + timedelta(milliseconds=200)
    store.accept(nonce, client_id="c", expires_at=expired, require_challenge=False, now=now, scope=VM_B)
    time.sleep(0.4)
    later = utcnow()
    with pytest.raises(NonceReplayed):
        store.accept(nonce, client_id="c", expires_at=later + DOCUMENT_LIFETIME, require_challenge=False,
                     now=later, scope=VM_A)
    # (VM B's entry may outlive its own lifetime: Redis keeps every VM of a nonce in one key, which lives as
    # long as the longest of them. Records live *at least* as long as they must; longer only refuses more.)
