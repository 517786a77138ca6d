"""Regression tests of the three findings of the AIA fallback's review, against a CA server on loopback.

1. A second fetched CA dropped the first (the augmented trust was rebuilt from the base trust per CA).
2. The negative cache was keyed by URL but stored failures that depend on the signer, so one forged
   document shut the fallback for genuine ones; and every forged URL cost a fetch under one global lock.
3. China trusted any DigiCert CA chaining to its roots; and with the fallback on, ``certs remove`` did not
   distrust a CA, because the fallback fetched it again.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.trust import fingerprint
from attest_service.trust.aia import AiaFetcher, AiaPolicy, AllowRule
from attest_service.trust.pins import add_fingerprint_pin, remove_pin
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy

from .conftest import CaServer, Pki, digicert_name, make_ca, make_leaf, make_named_ca, make_root, sign_document

POLICY = VerificationPolicy()
PREFIX = "/pkiops/certs/"
#: Fetches the fallback may make for a stream of documents naming new URLs (the fetcher's default burst).
FETCH_BOUND = 10


def _der(ca: pki.CertifiedKey) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _fetcher(server: CaServer, cloud: str = "public", **kwargs: object) -> AiaFetcher:
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
    options: dict[str, object] = {"allow_address": lambda address: address.is_loopback}
    options.update(kwargs)
    return AiaFetcher(AiaPolicy(allow={cloud: (rule,)}), **options)  # type: ignore[arg-type]


class FakeClock:
    """A monotonic clock moved by hand (the reload interval), so reloads happen without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- 1. a second fetched CA drops the first -------------------------------------------------------------


def test_a_second_fetched_ca_keeps_the_first_trusted(server: CaServer, pinned: Path, pki_set: Pki,
                                                      leaf_key) -> None:
    documents = []
    for number in ("41", "42", "43"):
        ca = make_ca(f"Ops Issuing CA {number}", pki_set.root, pki_set.now)
        url = server.publish(f"{PREFIX}ca{number}.crt", _der(ca))
        documents.append(sign_document(make_leaf(ca, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now))
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    for document in (*documents, *documents):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert sum(server.hits.values()) == 3  # each CA fetched once, then reused


def test_after_a_reload_a_fetched_ca_is_rechecked_from_the_cache_not_fetched_again(server: CaServer, pinned: Path,
                                                                                   pki_set: Pki, leaf_key) -> None:
    ca = make_ca("Ops Issuing CA 44", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca44.crt", _der(ca))
    document = sign_document(make_leaf(ca, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    holder.verify(document, policy=POLICY, now=pki_set.now)
    holder.request_reload()
    holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[PREFIX + "ca44.crt"] == 1


# --- 2. the negative cache and the cost of forged documents --------------------------------------------


def test_a_forged_document_naming_the_real_url_does_not_shut_the_fallback(server: CaServer, pinned: Path,
                                                                         pki_set: Pki, leaf_key) -> None:
    # The forger names the real new CA as issuer and its real URL, but signs with a key of its own.
    genuine_ca = make_ca("Ops Issuing CA 42", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca42.crt", _der(genuine_ca))
    genuine = sign_document(make_leaf(genuine_ca, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    impostor = make_ca("Ops Issuing CA 42", make_root("Ops Forger Root", pki_set.now), pki_set.now)
    forged = sign_document(make_leaf(impostor, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    for _ in range(3):
        with pytest.raises(UntrustedChain):
            holder.verify(forged, policy=POLICY, now=pki_set.now)
    holder.verify(genuine, policy=POLICY, now=pki_set.now)
    with pytest.raises(UntrustedChain):
        holder.verify(forged, policy=POLICY, now=pki_set.now)
    holder.verify(genuine, policy=POLICY, now=pki_set.now)
    assert server.hits[PREFIX + "ca42.crt"] == 1


def test_forged_documents_with_random_paths_cost_a_bounded_number_of_fetches(server: CaServer, pinned: Path,
                                                                            pki_set: Pki, leaf_key) -> None:
    forger = make_ca("Ops Issuing CA 66", make_root("Ops Forger Root", pki_set.now), pki_set.now)
    # A clock that stands still: the bound must not depend on how fast this machine signs documents.
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server, clock=lambda: 0.0))
    for index in range(3 * FETCH_BOUND):
        leaf = make_leaf(forger, leaf_key, pki_set.now, ca_issuers=[server.url(f"{PREFIX}random-{index}.crt")])
        with pytest.raises(UntrustedChain):
            holder.verify(sign_document(leaf, pki_set.now), policy=POLICY, now=pki_set.now)
    assert sum(server.hits.values()) <= FETCH_BOUND


def test_a_slow_fetch_does_not_hold_up_other_documents(server: CaServer, pinned: Path, pki_set: Pki,
                                                       leaf_key) -> None:
    slow_ca, fast_ca = (make_ca(f"Ops Issuing CA {n}", pki_set.root, pki_set.now) for n in ("51", "52"))
    slow_url = server.publish(PREFIX + "slow.crt", _der(slow_ca))
    release = server.hold(PREFIX + "slow.crt")
    fast_url = server.publish(PREFIX + "fast.crt", _der(fast_ca))
    slow = sign_document(make_leaf(slow_ca, leaf_key, pki_set.now, ca_issuers=[slow_url]), pki_set.now)
    fast = sign_document(make_leaf(fast_ca, leaf_key, pki_set.now, ca_issuers=[fast_url]), pki_set.now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    errors: list[BaseException] = []

    def verify_slow() -> None:
        try:
            holder.verify(slow, policy=POLICY, now=pki_set.now)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=verify_slow)
    thread.start()
    try:
        assert server.arrived[PREFIX + "slow.crt"].wait(10), "the slow fetch never reached the server"
        # The slow repository holds its answer until released: the other document is verified meanwhile.
        holder.verify(fast, policy=POLICY, now=pki_set.now)
        assert thread.is_alive(), "the other document waited until the slow fetch had ended"
    finally:
        release.set()
        thread.join(timeout=10)
    assert errors == []
    assert server.hits[PREFIX + "slow.crt"] == 1


def test_concurrent_documents_under_one_new_ca_fetch_it_once(server: CaServer, pinned: Path, pki_set: Pki,
                                                             leaf_key) -> None:
    ca = make_ca("Ops Issuing CA 53", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca53.crt", _der(ca))
    server.delays[PREFIX + "ca53.crt"] = 0.5
    document = sign_document(make_leaf(ca, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    errors: list[BaseException] = []

    def verify() -> None:
        try:
            holder.verify(document, policy=POLICY, now=pki_set.now)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=verify) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert server.hits[PREFIX + "ca53.crt"] == 1


# --- 3. China, and removed pins -------------------------------------------------------------------------


def test_china_does_not_trust_digicert_public_cas(server: CaServer, tmp_path: Path, leaf_key) -> None:
    # A DigiCert CA that chains to China's pinned DigiCert root and issued a signer of metadata.azure.cn,
    # but is not one of Azure China's issuing CAs: DigiCert's public DV/OV CAs look exactly like this.
    now = datetime.now(UTC)
    root = make_named_ca(digicert_name("Ops DigiCert Global Root G2"), None, now, days=3650)
    public_ca = make_named_ca(digicert_name("Ops DigiCert Public DV CA"), root, now)
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "china", root=root.certificate, intermediates=[])
    url = server.publish(PREFIX + "public-dv.crt", _der(public_ca))
    # The positive control: one of Azure China's issuing CAs, pinned by fingerprint with its URL on the same
    # server, is fetched and trusted by the same fallback, so the refusal below is the China rule's.
    azure_ca = make_named_ca(digicert_name("Ops DigiCert Basic RSA CN CA G2"), root, now)
    azure_url = server.publish(PREFIX + "azure-cn.crt", _der(azure_ca))
    add_fingerprint_pin(directory, "china", fingerprint(azure_ca.certificate), url=azure_url,
                        name="Ops DigiCert Basic RSA CN CA G2", now=now, policy=_fetcher(server, cloud="china").policy)
    china = VerificationPolicy(cloud="china")
    holder = ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, cloud="china"))
    azure_leaf = make_leaf(azure_ca, leaf_key, now, ca_issuers=[azure_url], domain="metadata.azure.cn")
    assert holder.verify(sign_document(azure_leaf, now), policy=china, now=now).signer.issuer.startswith(
        "CN=Ops DigiCert Basic RSA CN CA G2")
    assert server.hits[PREFIX + "azure-cn.crt"] == 1
    leaf = make_leaf(public_ca, leaf_key, now, ca_issuers=[url], domain="metadata.azure.cn")
    with pytest.raises(UntrustedChain, match="china takes only issuing CAs pinned by fingerprint"):
        holder.verify(sign_document(leaf, now), policy=china, now=now)
    # Refused for what it is, without a fetch: no fingerprint pin names its URL.
    assert server.hits[PREFIX + "public-dv.crt"] == 0


def test_a_removed_pin_stays_distrusted_with_the_fallback_on(server: CaServer, pinned: Path, pki_set: Pki,
                                                           leaf_key) -> None:
    # The pinned issuing CA is also published at its AIA URL, as Azure's are.
    url = server.publish(PREFIX + "issuing-01.crt", _der(pki_set.issuing))
    document = sign_document(make_leaf(pki_set.issuing, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server), clock=clock)
    holder.verify(document, policy=POLICY, now=pki_set.now)
    remove_pin(pinned, "public", fingerprint(pki_set.issuing.certificate))
    clock.now += 10
    with pytest.raises(UntrustedChain, match=r"was unpinned with certs remove \(public/intermediates/removed.txt\)"):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    # The fallback did fetch it, and refused what it fetched because it was removed.
    assert server.hits[PREFIX + "issuing-01.crt"] == 1
    # The positive control: after the same reload, the same fallback fetches and trusts a CA never removed.
    other = make_ca("Ops Issuing CA 45", pki_set.root, pki_set.now)
    other_url = server.publish(PREFIX + "ca45.crt", _der(other))
    holder.verify(sign_document(make_leaf(other, leaf_key, pki_set.now, ca_issuers=[other_url]), pki_set.now),
                  policy=POLICY, now=pki_set.now)
    assert server.hits[PREFIX + "ca45.crt"] == 1
