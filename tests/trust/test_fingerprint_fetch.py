"""CAs pinned by fingerprint are fetched in the background, with the AIA fallback off (China by default).

Every fetch goes to a CA server on loopback, reached the way the AIA tests reach it: an allow-list naming
that server and an address check admitting loopback, both given to the fetcher (never read from a setting).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from prometheus_client import REGISTRY

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.settings import Settings
from attest_service.trust import fingerprint
from attest_service.trust.aia import AiaPolicy, AllowRule
from attest_service.trust.fetched import CACHE_DIR_NAME, OFFER_BURST, PinnedCaFetcher, cache_dir_for_store
from attest_service.trust.issuers import CertificateFetcher
from attest_service.trust.pins import add_fingerprint_pin
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy
from attest_service.web.app import create_app

from .conftest import CaServer, digicert_name, make_leaf, make_named_ca, sign_document

CHINA = VerificationPolicy(cloud="china")
#: Seconds a background round may take against the loopback server.
ROUND_SECONDS = 10.0


def _der(ca: pki.CertifiedKey) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _policy(server: CaServer) -> AiaPolicy:
    return AiaPolicy(allow={"china": (AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix="/"),)})


def _fetcher(server: CaServer, cache_dir: Path | None = None) -> PinnedCaFetcher:
    return PinnedCaFetcher(policy=_policy(server), cache_dir=cache_dir,
                           fetcher=CertificateFetcher(allow_address=lambda address: address.is_loopback))


@pytest.fixture
def china(tmp_path: Path) -> tuple[Path, pki.CertifiedKey]:
    """A china directory: a DigiCert-shaped root, no intermediate file; returns (directory, root)."""
    now = datetime.now(UTC)
    root = make_named_ca(digicert_name("Ops DigiCert Global Root CA"), None, now, days=3650)
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "china", root=root.certificate, intermediates=[])
    return directory, root


def _issuing(root: pki.CertifiedKey, name: str = "Ops DigiCert Basic RSA CN CA G2") -> pki.CertifiedKey:
    return make_named_ca(digicert_name(name), root, datetime.now(UTC))


def _pin(directory: Path, server: CaServer, digest: str, url: str | None, name: str = "Ops Basic RSA CN CA") -> None:
    add_fingerprint_pin(directory, "china", digest, url=url, name=name, now=datetime.now(UTC), policy=_policy(server))


def _document(ca: pki.CertifiedKey, leaf_key, url: str = "http://127.0.0.1:1/none.crt") -> bytes:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    return sign_document(make_leaf(ca, leaf_key, now, ca_issuers=[url], domain="metadata.azure.cn"), now)


def _started(directory: Path, fetcher: PinnedCaFetcher) -> ReloadingVerifier:
    """A verifier with the AIA fallback off, after its first background round."""
    verifier = ReloadingVerifier(directory, interval_seconds=1, pinned_fetch=fetcher)
    assert fetcher.wait_idle(ROUND_SECONDS)
    return verifier


def test_a_fingerprint_pinned_ca_is_fetched_at_start_with_the_fallback_off(server: CaServer, china,
                                                                         leaf_key) -> None:
    directory, root = china
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    document = _document(issuing, leaf_key)
    # Without background fetching (and without the AIA fallback) a China document is refused.
    with pytest.raises(UntrustedChain):
        ReloadingVerifier(directory, interval_seconds=1).verify(document, policy=CHINA, now=datetime.now(UTC))
    fetcher = _fetcher(server)
    verifier = _started(directory, fetcher)
    result = verifier.verify(document, policy=CHINA, now=datetime.now(UTC))
    assert result.signer.issuer.startswith("CN=Ops DigiCert Basic RSA CN CA G2")
    assert server.hits["/OpsBasicRSACNCAG2.crt"] == 1
    [state] = fetcher.states(verifier.trust)
    assert (state.state, state.sha256) == ("fetched", fingerprint(issuing.certificate))
    # It joins the trust as an intermediate of China, with where it came from.
    fetched = [pin for pin in verifier.trust.for_cloud("china").intermediates if pin.source == f"fetched:{url}"]
    assert [pin.sha256 for pin in fetched] == [fingerprint(issuing.certificate)]


def test_a_certificate_that_is_not_the_pinned_one_is_never_used(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    pinned = _issuing(root)
    # Same name, same root, another key: what a compromised or wrong repository could answer.
    impostor = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(impostor))
    _pin(directory, server, fingerprint(pinned.certificate), url)
    cache = directory.parent / CACHE_DIR_NAME
    fetcher = _fetcher(server, cache)
    verifier = _started(directory, fetcher)
    with pytest.raises(UntrustedChain):
        verifier.verify(_document(impostor, leaf_key), policy=CHINA, now=datetime.now(UTC))
    [state] = fetcher.states(verifier.trust)
    assert state.state == "failed"
    assert "mismatch" in state.detail
    assert not any(pin.source.startswith("fetched:") for pin in verifier.trust.for_cloud("china").intermediates)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_sha1_pin_accepts_only_bytes_with_that_sha1(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    issuing = _issuing(root, "Ops DigiCert Basic OV G2 TLS CN CA1")
    url = server.publish("/ov.crt", _der(issuing))
    _pin(directory, server, issuing.certificate.fingerprint(hashes.SHA1()).hex(), url)
    verifier = _started(directory, _fetcher(server))
    verifier.verify(_document(issuing, leaf_key), policy=CHINA, now=datetime.now(UTC))


def test_the_default_address_check_refuses_loopback(server: CaServer, china, leaf_key) -> None:
    # The same SSRF rules as the AIA fallback: the allow-list names the server, but loopback is not public.
    directory, root = china
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    fetcher = PinnedCaFetcher(policy=_policy(server))
    verifier = _started(directory, fetcher)
    assert server.hits["/OpsBasicRSACNCAG2.crt"] == 0
    [state] = fetcher.states(verifier.trust)
    assert (state.state, state.detail.split(":")[0]) == ("failed", "address_refused")


def test_a_url_off_the_allow_list_is_not_fetched(server: CaServer, china) -> None:
    directory, root = china
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    narrow = AiaPolicy(allow={"china": (AllowRule(scheme="http", host="127.0.0.1", port=server.port,
                                                  path_prefix="/elsewhere/"),)})
    fetcher = PinnedCaFetcher(policy=narrow, fetcher=CertificateFetcher(allow_address=lambda a: a.is_loopback))
    verifier = _started(directory, fetcher)
    assert server.hits["/OpsBasicRSACNCAG2.crt"] == 0
    assert fetcher.states(verifier.trust)[0].detail.startswith("not_allowed")


def test_the_embedded_store_keeps_a_fetched_ca_beside_its_sqlite_file(server: CaServer, china, leaf_key,
                                                                      tmp_path: Path) -> None:
    directory, root = china
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    cache = cache_dir_for_store(f"sqlite:///{tmp_path / 'state' / 'nonces.sqlite3'}")
    assert cache == tmp_path / "state" / CACHE_DIR_NAME
    _started(directory, _fetcher(server, cache))
    kept = list(cache.iterdir())
    assert [path.name for path in kept] == [f"china-{fingerprint(issuing.certificate)}.pem"]
    # A restart with the repository gone still verifies, from the copy on disk.
    server.routes.clear()
    restarted = _started(directory, _fetcher(server, cache))
    restarted.verify(_document(issuing, leaf_key), policy=CHINA, now=datetime.now(UTC))
    assert server.hits["/OpsBasicRSACNCAG2.crt"] == 1
    # A file put there that is not the pinned certificate is never used.
    impostor = _issuing(root)
    kept[0].write_bytes(impostor.certificate.public_bytes(serialization.Encoding.PEM))
    (cache / f"china-{fingerprint(impostor.certificate)}.pem").write_bytes(
        impostor.certificate.public_bytes(serialization.Encoding.PEM))
    tampered = _started(directory, _fetcher(server, cache))
    for ca in (issuing, impostor):
        with pytest.raises(UntrustedChain):
            tampered.verify(_document(ca, leaf_key), policy=CHINA, now=datetime.now(UTC))
    assert cache_dir_for_store("redis://127.0.0.1:6379/0") is None


def test_a_pin_added_later_is_fetched_on_reload(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    fetcher = _fetcher(server)
    verifier = _started(directory, fetcher)
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    verifier.request_reload()
    verifier.verifier()  # the reload, which starts a background round
    assert fetcher.wait_idle(ROUND_SECONDS)
    verifier.verify(_document(issuing, leaf_key), policy=CHINA, now=datetime.now(UTC))


def test_certs_list_and_the_metrics_show_whether_each_pin_is_fetched(server: CaServer, china, leaf_key, run_cli,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    directory, root = china
    issuing = _issuing(root)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, server, fingerprint(issuing.certificate), url)
    _pin(directory, server, "ab" * 32, server.url("/missing.crt"), name="Ops Missing CA")
    store = f"sqlite:///{tmp_path / 'state' / 'nonces.sqlite3'}"
    monkeypatch.setenv("ATTEST_NONCE_STORE", store)
    code, out, _ = run_cli("certs", "list", "--json", "--pinned-certs", str(directory))
    assert code == 0
    assert {pin["name"]: pin["status"] for pin in json.loads(out)["fingerprintPins"]} == {
        "Ops Basic RSA CN CA": "awaiting_fetch", "Ops Missing CA": "awaiting_fetch"}
    # The service, as create_app builds it (AIA fallback off), with its fetcher given a loopback server.
    settings = Settings.from_env({"ATTEST_PINNED_CERTS": str(directory), "ATTEST_NONCE_STORE": store})
    fetcher = _fetcher(server, cache_dir_for_store(store))
    app = create_app(settings, pinned_fetch=fetcher)
    assert fetcher.wait_idle(ROUND_SECONDS)
    code, out, _ = run_cli("certs", "list", "--json", "--pinned-certs", str(directory))
    assert {pin["name"]: pin["status"] for pin in json.loads(out)["fingerprintPins"]} == {
        "Ops Basic RSA CN CA": "fetched", "Ops Missing CA": "awaiting_fetch"}
    code, out, _ = run_cli("certs", "list", "--pinned-certs", str(directory))
    assert any("Ops Basic RSA CN CA" in line and "fetched" in line for line in out.splitlines())
    assert REGISTRY.get_sample_value("attest_fingerprint_pin_fetched", {
        "cloud": "china", "name": "Ops Basic RSA CN CA", "digest": fingerprint(issuing.certificate),
        "state": "fetched"}) == 1.0
    assert REGISTRY.get_sample_value("attest_fingerprint_pin_fetched", {
        "cloud": "china", "name": "Ops Missing CA", "digest": "ab" * 32, "state": "failed"}) == 0.0
    # The fetched CA's expiry is published like a pin's.
    assert REGISTRY.get_sample_value("attest_pinned_certificate_not_after_seconds", {
        "cloud": "china", "role": "intermediate", "subject": "Ops DigiCert Basic RSA CN CA G2",
        "sha256": fingerprint(issuing.certificate)}) == issuing.certificate.not_valid_after_utc.timestamp()
    assert app is not None


# --- a pin without a URL: the URL a refused document names, fetched in the background ----------------------


def _sha1(ca: pki.CertifiedKey) -> str:
    return ca.certificate.fingerprint(hashes.SHA1()).hex()


def test_a_pin_without_url_is_fetched_from_a_refused_documents_url(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    issuing = _issuing(root, "Ops DigiCert Basic OV G2 TLS CN CA1")
    url = server.publish("/ov.crt", _der(issuing))
    _pin(directory, server, _sha1(issuing), None, name="Ops OV CA")
    fetcher = _fetcher(server)
    verifier = _started(directory, fetcher)
    assert server.hits["/ov.crt"] == 0
    document = _document(issuing, leaf_key, url)
    # Never on the request path: the first document is refused, and its URL is fetched in the background.
    with pytest.raises(UntrustedChain):
        verifier.verify(document, policy=CHINA, now=datetime.now(UTC))
    assert fetcher.wait_idle(ROUND_SECONDS)
    verifier.verify(document, policy=CHINA, now=datetime.now(UTC))
    assert server.hits["/ov.crt"] == 1
    assert fetcher.states(verifier.trust)[0].state == "fetched"


def test_a_refused_documents_url_answering_another_ca_changes_nothing(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    pinned = _issuing(root, "Ops DigiCert Basic OV G2 TLS CN CA1")
    impostor = _issuing(root, "Ops DigiCert Basic OV G2 TLS CN CA1")
    url = server.publish("/ov.crt", _der(impostor))
    _pin(directory, server, _sha1(pinned), None, name="Ops OV CA")
    fetcher = _fetcher(server)
    verifier = _started(directory, fetcher)
    document = _document(impostor, leaf_key, url)
    for _ in range(3):
        with pytest.raises(UntrustedChain):
            verifier.verify(document, policy=CHINA, now=datetime.now(UTC))
        assert fetcher.wait_idle(ROUND_SECONDS)
    # Fetched once (the URL is not offered again before the retry delay), and never used.
    assert server.hits["/ov.crt"] == 1
    assert fetcher.states(verifier.trust)[0].state == "no_url"


def test_forged_documents_naming_many_urls_spend_a_bounded_budget(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    pinned = _issuing(root, "Ops DigiCert Basic OV G2 TLS CN CA1")
    _pin(directory, server, _sha1(pinned), None, name="Ops OV CA")
    forger = _issuing(root, "Ops Forger CA")
    fetcher = _fetcher(server)
    verifier = _started(directory, fetcher)
    for n in range(OFFER_BURST + 5):
        with pytest.raises(UntrustedChain):
            verifier.verify(_document(forger, leaf_key, server.url(f"/forged-{n}.crt")), policy=CHINA,
                            now=datetime.now(UTC))
    assert fetcher.wait_idle(ROUND_SECONDS)
    assert sum(server.hits.values()) == OFFER_BURST
    # A URL off the allow-list is not fetched at all.
    narrow = PinnedCaFetcher(policy=AiaPolicy(allow={"china": (AllowRule(
        scheme="http", host="127.0.0.1", port=server.port, path_prefix="/allowed/"),)}),
        fetcher=CertificateFetcher(allow_address=lambda address: address.is_loopback))
    elsewhere = _started(directory, narrow)
    with pytest.raises(UntrustedChain):
        elsewhere.verify(_document(forger, leaf_key, server.url("/elsewhere.crt")), policy=CHINA,
                         now=datetime.now(UTC))
    assert narrow.wait_idle(ROUND_SECONDS)
    assert server.hits["/elsewhere.crt"] == 0
