"""The AIA fallback against a real HTTP server on loopback."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY

from attest_service.errors import UntrustedChain
from attest_service.trust import load_trust
from attest_service.trust.aia import MAX_CACHE_ENTRIES, AiaFetcher, AiaPolicy, AllowRule, is_public_address
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy

from .conftest import CaServer, Pki, make_ca, make_leaf, make_root, sign_document

POLICY = VerificationPolicy()
PREFIX = "/pkiops/certs/"


def _fetcher(server: CaServer, **kwargs: object) -> AiaFetcher:
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
    options: dict[str, object] = {"allow_address": lambda address: address.is_loopback}
    options.update(kwargs)
    return AiaFetcher(AiaPolicy(allow={"public": (rule,)}), **options)  # type: ignore[arg-type]


def _fetches(result: str) -> float:
    return REGISTRY.get_sample_value("attest_aia_fetch_total", {"result": result}) or 0.0


def _unpinned_document(pki_set: Pki, leaf_key, url: str, *, root=None) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """A document whose issuing CA is not pinned and is published at ``url``; returns (document, CA DER)."""
    ca = make_ca("Ops Issuing CA 42", root or pki_set.root, pki_set.now)
    leaf = make_leaf(ca, leaf_key, pki_set.now, ca_issuers=[url])
    return sign_document(leaf, pki_set.now), ca.certificate.public_bytes(serialization.Encoding.DER)


def test_allow_listed_issuer_is_fetched_validated_and_cached(server: CaServer, pinned: Path, pki_set: Pki,
                                                            leaf_key) -> None:
    path = PREFIX + "ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    server.routes[path] = (200, {"Content-Type": "application/pkix-cert"}, der)
    fetched, cached = _fetches("fetched"), _fetches("cached")
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    result = holder.verify(document, policy=POLICY, now=pki_set.now)
    assert result.signer.issuer.startswith("CN=Ops Issuing CA 42")
    holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 1
    assert (_fetches("fetched"), _fetches("cached")) == (fetched + 1, cached + 1)
    # The fallback never writes to the pinned directory: pinning stays the operator's decision.
    assert len(holder.trust.for_cloud("public").intermediates) == 1


def test_without_the_fallback_the_document_is_refused(server: CaServer, pinned: Path, pki_set: Pki,
                                                      leaf_key) -> None:
    path = PREFIX + "ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    server.routes[path] = (200, {}, der)
    with pytest.raises(UntrustedChain):
        ReloadingVerifier(pinned, interval_seconds=10).verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 0


def test_url_outside_the_allow_list_is_not_fetched(server: CaServer, pinned: Path, pki_set: Pki, leaf_key) -> None:
    path = "/elsewhere/ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    server.routes[path] = (200, {}, der)
    before = _fetches("not_allowed")
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server))
    with pytest.raises(UntrustedChain, match="not allowed"):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 0
    assert _fetches("not_allowed") == before + 1


def test_loopback_is_refused_by_the_default_address_check(server: CaServer, pinned: Path, pki_set: Pki,
                                                          leaf_key) -> None:
    path = PREFIX + "ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    server.routes[path] = (200, {}, der)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server, allow_address=is_public_address))
    with pytest.raises(UntrustedChain, match="non-public address"):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 0


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "::1",
                                     "fe80::1", "224.0.0.1", "0.0.0.0", "100.64.0.1"])
def test_default_address_check_refuses_internal_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


def test_default_address_check_accepts_public_addresses() -> None:
    assert is_public_address(ipaddress.ip_address("13.107.246.45"))


@pytest.mark.parametrize("case", ["oversize", "oversize_undeclared", "redirect", "not_found", "garbage",
                                  "wrong_ca", "untrusted_ca"])
def test_bad_answers_are_refused_and_fetched_once(server: CaServer, pinned: Path, pki_set: Pki, leaf_key,
                                                  case: str) -> None:
    path = PREFIX + "ops-issuing-ca-42.crt"
    root = make_root("Ops Rogue Root", pki_set.now) if case == "untrusted_ca" else None
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path), root=root)
    expected = {"oversize": "too_large", "oversize_undeclared": "too_large", "redirect": "redirect",
                "not_found": "http_error", "garbage": "invalid", "wrong_ca": "not_issuer", "untrusted_ca": "untrusted"}
    if case == "oversize":
        server.routes[path] = (200, {}, der + b"\0" * 17 * 1024)
    elif case == "oversize_undeclared":
        server.routes[path] = (200, {}, der)
    elif case == "redirect":
        server.routes[path] = (302, {"Location": server.url(PREFIX + "other.crt")}, b"")
        server.routes[PREFIX + "other.crt"] = (200, {}, der)
    elif case == "untrusted_ca":
        server.routes[path] = (200, {}, der)
    elif case == "garbage":
        server.routes[path] = (200, {}, b"\x30\x03\x02\x01\x00")
    elif case == "wrong_ca":
        # Same name, different key: it did not issue the signer's certificate.
        server.routes[path] = (200, {}, make_ca("Ops Issuing CA 42", pki_set.root, pki_set.now).certificate
                               .public_bytes(serialization.Encoding.DER))
    fetcher = _fetcher(server, max_bytes=len(der) - 1) if case == "oversize_undeclared" else _fetcher(server)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=fetcher)
    before, negative = _fetches(expected[case]), _fetches("negative_cached")
    for _ in range(2):
        with pytest.raises(UntrustedChain):
            holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 1
    assert server.hits[PREFIX + "other.crt"] == 0
    if case in ("wrong_ca", "untrusted_ca"):
        # The URL answered a certificate: it is kept (no second fetch) and the rules are applied to it
        # again, so the verdict is the same and nothing about the URL is cached as a failure.
        assert _fetches(expected[case]) == before + 2
        assert _fetches("negative_cached") == negative
    else:
        # Fetch and parse failures depend on the URL alone: cached as such.
        assert _fetches(expected[case]) == before + 1
        assert _fetches("negative_cached") == negative + 1


def test_negative_cache_expires(server: CaServer, pinned: Path, pki_set: Pki, leaf_key) -> None:
    path = PREFIX + "ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    moment = [0.0]
    holder = ReloadingVerifier(pinned, interval_seconds=10,
                         aia=_fetcher(server, negative_ttl_seconds=60, clock=lambda: moment[0]))
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)  # 404: not published yet
    server.routes[path] = (200, {}, der)
    moment[0] = 30
    with pytest.raises(UntrustedChain, match="failed recently"):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    moment[0] = 61
    holder.verify(document, policy=POLICY, now=pki_set.now)
    assert server.hits[path] == 2


def test_a_flood_of_new_urls_evicts_the_oldest_answers_not_all_of_them(server: CaServer, pinned: Path,
                                                                       pki_set: Pki, leaf_key) -> None:
    # The cache used to be cleared whole when full: one URL past the bound flushed the answers for every
    # genuine URL at once, and each of them cost a fetch (and the budget) again.
    ca = make_ca("Ops Issuing CA 42", pki_set.root, pki_set.now)
    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    count = MAX_CACHE_ENTRIES + 20
    signers = [make_leaf(ca, leaf_key, pki_set.now, ca_issuers=[server.publish(f"{PREFIX}ca-{index}.crt", der)])
               .certificate for index in range(count)]
    # A clock that stands still (no TTL runs out) and a budget that does not run dry: only the bound evicts.
    fetcher = _fetcher(server, clock=lambda: 0.0, fetch_burst=2 * count)
    trust = load_trust(pinned).for_cloud("public")
    for signer in signers:
        fetcher.issuer_for(signer, trust, now=pki_set.now)
    assert sum(server.hits.values()) == count
    for signer in signers[-MAX_CACHE_ENTRIES:]:
        fetcher.issuer_for(signer, trust, now=pki_set.now)
    assert sum(server.hits.values()) == count  # the newest answers all stayed cached
    assert len(fetcher._answers) <= MAX_CACHE_ENTRIES  # the bound itself
    fetcher.issuer_for(signers[0], trust, now=pki_set.now)
    assert server.hits[f"{PREFIX}ca-0.crt"] == 2  # the oldest was the one evicted


def test_azure_allow_list() -> None:
    policy = AiaPolicy.azure()
    assert policy.allowed("public", "http://www.microsoft.com/pkiops/certs/Microsoft%20Azure%20RSA%20TLS%20Issuing"
                                    "%20CA%2007%20-%20xsign.crt")
    assert policy.allowed("public", "http://cacerts.digicert.com/DigiCertGlobalRootG2.crt")
    assert policy.allowed("usgov", "http://www.microsoft.com/pki/mscorp/Microsoft%20RSA%20TLS%20CA%2001.crt")
    for url in ("http://www.microsoft.com.evil.example/pkiops/certs/x.crt", "ftp://www.microsoft.com/pkiops/certs/x",
                "http://www.microsoft.com/pkiops/other/x.crt", "http://www.microsoft.com:8080/pkiops/certs/x.crt",
                "http://user@www.microsoft.com/pkiops/certs/x.crt", "http://www.microsoft.com/pkiops/certs/../x",
                "http://www.microsoft.com/pkiops/certs/%2e%2e/%2e%2e/en-us/x", "http://www.microsoft.com/pkiops/certs/a%2fb",
                "http://www.microsoft.com/pkiops/certs/x.crt?redirect=1", "http://169.254.169.254/pkiops/certs/x"):
        assert not policy.allowed("public", url), url
    assert not policy.allowed("germany", "http://www.microsoft.com/pkiops/certs/x.crt")


def test_a_ca_of_another_organisation_is_refused_even_when_it_chains(server: CaServer, pinned: Path, pki_set: Pki,
                                                                    leaf_key) -> None:
    # The fetched CA chains to the cloud's root and issued the signer, but its subject names an organisation
    # the cloud's documents do not use (as DigiCert's own public CAs would under DigiCert Global Root G2).
    path = PREFIX + "ops-issuing-ca-42.crt"
    document, der = _unpinned_document(pki_set, leaf_key, server.url(path))
    server.routes[path] = (200, {}, der)
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
    policy = AiaPolicy(allow={"public": (rule,)}, organizations={"public": ("Contoso Ltd",)})
    fetcher = AiaFetcher(policy, allow_address=lambda address: address.is_loopback)
    before = _fetches("invalid")
    with pytest.raises(UntrustedChain, match="organisation"):
        ReloadingVerifier(pinned, interval_seconds=10, aia=fetcher).verify(document, policy=POLICY, now=pki_set.now)
    assert _fetches("invalid") == before + 1
