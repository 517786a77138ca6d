"""Intermediates pinned by fingerprint: the AIA fallback takes exactly those bytes; certs shows and edits them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.trust import MANIFEST, fingerprint, load_trust
from attest_service.trust.aia import FETCH_BURST, AiaFetcher, AiaPolicy, AllowRule
from attest_service.trust.pins import add_fingerprint_pin, add_pins, remove_pin
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy

from .conftest import (
    BUNDLED,
    CaServer,
    Pki,
    digicert_name,
    make_ca,
    make_leaf,
    make_named_ca,
    make_root,
    pem,
    sign_document,
    tree_digest,
    write_manifest,
)

CHINA = VerificationPolicy(cloud="china")
PUBLIC = VerificationPolicy(cloud="public")
PREFIX = "/pkiops/certs/"


def _der(ca: pki.CertifiedKey) -> bytes:
    return ca.certificate.public_bytes(serialization.Encoding.DER)


def _sha1(ca: pki.CertifiedKey) -> str:
    return ca.certificate.fingerprint(hashes.SHA1()).hex()


def _policy(server: CaServer, cloud: str) -> AiaPolicy:
    return AiaPolicy(allow={cloud: (AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix="/"),)})


def _fetcher(server: CaServer, cloud: str, **kwargs: object) -> AiaFetcher:
    return AiaFetcher(_policy(server, cloud), allow_address=lambda address: address.is_loopback,
                      **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def china(tmp_path: Path) -> tuple[Path, pki.CertifiedKey]:
    """A china directory: a DigiCert-shaped root, no intermediate; returns (directory, root)."""
    now = datetime.now(UTC)
    root = make_named_ca(digicert_name("Ops DigiCert Global Root CA"), None, now, days=3650)
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "china", root=root.certificate, intermediates=[])
    write_manifest(directory)
    return directory, root


def _china_document(ca: pki.CertifiedKey, leaf_key, url: str) -> bytes:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    return sign_document(make_leaf(ca, leaf_key, now, ca_issuers=[url], domain="metadata.azure.cn"), now)


def _pin(directory: Path, cloud: str, digest: str, url: str | None, server: CaServer, name: str = "pinned") -> None:
    add_fingerprint_pin(directory, cloud, digest, url=url, name=name, now=datetime.now(UTC),
                        policy=_policy(server, cloud))


# --- the fallback ---------------------------------------------------------------------------------------


def test_china_takes_the_ca_pinned_by_sha256_from_its_url(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    now = datetime.now(UTC)
    issuing = make_named_ca(digicert_name("Ops DigiCert Basic RSA CN CA G2"), root, now)
    url = server.publish("/OpsBasicRSACNCAG2.crt", _der(issuing))
    _pin(directory, "china", fingerprint(issuing.certificate), url, server, "Ops DigiCert Basic RSA CN CA G2")
    # Another DigiCert CA under the same root, published on the same allowed host: not pinned.
    public_ca = make_named_ca(digicert_name("Ops DigiCert Public DV CA"), root, now)
    other_url = server.publish("/OpsPublicDV.crt", _der(public_ca))
    holder = ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china"))
    result = holder.verify(_china_document(issuing, leaf_key, url), policy=CHINA, now=now)
    assert result.signer.issuer.startswith("CN=Ops DigiCert Basic RSA CN CA G2")
    with pytest.raises(UntrustedChain, match="pinned by fingerprint"):
        holder.verify(_china_document(public_ca, leaf_key, other_url), policy=CHINA, now=now)
    # A URL no fingerprint pin names is not even fetched.
    assert server.hits["/OpsPublicDV.crt"] == 0


def test_a_sha1_pin_without_url_takes_exactly_that_certificate(server: CaServer, china, leaf_key) -> None:
    directory, root = china
    now = datetime.now(UTC)
    issuing = make_named_ca(digicert_name("Ops DigiCert Basic OV G2 TLS CN CA1"), root, now)
    _pin(directory, "china", _sha1(issuing).upper(), None, server)
    holder = ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china"))
    url = server.publish("/any/allowed/path.crt", _der(issuing))
    holder.verify(_china_document(issuing, leaf_key, url), policy=CHINA, now=now)
    # Same name, other key, chaining to the same root: the fingerprint tells them apart.
    impostor = make_named_ca(digicert_name("Ops DigiCert Basic OV G2 TLS CN CA1"), root, now)
    other_url = server.publish("/other/path.crt", _der(impostor))
    with pytest.raises(UntrustedChain, match="not pinned by fingerprint"):
        holder.verify(_china_document(impostor, leaf_key, other_url), policy=CHINA, now=now)


def test_a_fingerprint_pin_still_needs_a_chain_to_a_pinned_root(server: CaServer, china, leaf_key) -> None:
    directory, _ = china
    now = datetime.now(UTC)
    stranger = make_named_ca(digicert_name("Ops DigiCert Stranger CA"),
                             make_named_ca(digicert_name("Ops Unpinned Root"), None, now), now)
    url = server.publish("/stranger.crt", _der(stranger))
    _pin(directory, "china", fingerprint(stranger.certificate), url, server)
    holder = ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china"))
    with pytest.raises(UntrustedChain, match="does not chain"):
        holder.verify(_china_document(stranger, leaf_key, url), policy=CHINA, now=now)


def test_a_fingerprint_pin_admits_a_ca_the_organisation_rule_would_refuse(server: CaServer, pinned: Path,
                                                                          pki_set: Pki, leaf_key) -> None:
    # In the public cloud a fetched CA must name Microsoft, unless the operator pinned its fingerprint.
    other = make_named_ca(digicert_name("Ops DigiCert Issued For Azure"), pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "digicert-for-azure.crt", _der(other))
    document = sign_document(make_leaf(other, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    with pytest.raises(UntrustedChain, match="organisation"):
        ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server, "public")).verify(
            document, policy=PUBLIC, now=pki_set.now)
    _pin(pinned, "public", fingerprint(other.certificate), url, server)
    ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server, "public")).verify(
        document, policy=PUBLIC, now=pki_set.now)


def test_a_staged_fingerprint_pin_is_fetched_even_when_forged_urls_spent_the_budget(server: CaServer, pinned: Path,
                                                                                    pki_set: Pki, leaf_key) -> None:
    successor = make_ca("Ops Issuing CA 61", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca61.crt", _der(successor))
    _pin(pinned, "public", fingerprint(successor.certificate), url, server)
    # A clock that stands still: the budget does not refill while the test runs, however slow the machine.
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=_fetcher(server, "public", clock=lambda: 0.0))
    forger = make_ca("Ops Issuing CA 66", make_root("Ops Forger Root", pki_set.now), pki_set.now)
    for index in range(FETCH_BURST + 2):
        leaf = make_leaf(forger, leaf_key, pki_set.now, ca_issuers=[server.url(f"{PREFIX}forged-{index}.crt")])
        with pytest.raises(UntrustedChain):
            holder.verify(sign_document(leaf, pki_set.now), policy=PUBLIC, now=pki_set.now)
    assert sum(server.hits.values()) == FETCH_BURST
    document = sign_document(make_leaf(successor, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    holder.verify(document, policy=PUBLIC, now=pki_set.now)


def test_removing_a_fingerprint_pin_distrusts_it_and_adding_it_back_trusts_it_again(server: CaServer, china,
                                                                                    leaf_key) -> None:
    directory, root = china
    now = datetime.now(UTC)
    issuing = make_named_ca(digicert_name("Ops DigiCert Basic RSA CN CA G2"), root, now)
    url = server.publish("/ca.crt", _der(issuing))
    digest = fingerprint(issuing.certificate)
    _pin(directory, "china", digest, url, server)
    document = _china_document(issuing, leaf_key, url)
    ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china")).verify(document, policy=CHINA,
                                                                                      now=now)
    remove_pin(directory, "china", digest)
    assert digest in load_trust(directory).for_cloud("china").removed
    with pytest.raises(UntrustedChain):
        ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china")).verify(
            document, policy=CHINA, now=now)
    _pin(directory, "china", digest, url, server)
    assert not load_trust(directory).for_cloud("china").removed
    ReloadingVerifier(directory, interval_seconds=10, aia=_fetcher(server, "china")).verify(document, policy=CHINA,
                                                                                      now=now)


def test_a_removed_file_pin_is_refused_from_the_cache_too_and_certs_add_takes_it_back(server: CaServer, pinned: Path,
                                                                                     pki_set: Pki, leaf_key) -> None:
    successor = make_ca("Ops Issuing CA 62", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca62.crt", _der(successor))
    document = sign_document(make_leaf(successor, leaf_key, pki_set.now, ca_issuers=[url]), pki_set.now)
    now = datetime.now(UTC)
    fetcher = _fetcher(server, "public")
    add_pins(pinned, "public", pem(successor.certificate), origin="ca62.pem", now=now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=fetcher)
    holder.verify(document, policy=PUBLIC, now=pki_set.now)
    remove_pin(pinned, "public", fingerprint(successor.certificate))
    holder.request_reload()
    # Fetched once while unpinned would be cached for an hour: the removal must win over the cache.
    for _ in range(2):
        with pytest.raises(UntrustedChain, match="certs remove"):
            holder.verify(document, policy=PUBLIC, now=pki_set.now)
    add_pins(pinned, "public", pem(successor.certificate), origin="ca62.pem", now=now)
    assert not load_trust(pinned).for_cloud("public").removed
    holder.request_reload()
    holder.verify(document, policy=PUBLIC, now=pki_set.now)


# --- the certs command ------------------------------------------------------------------------------------


def test_certs_add_fingerprint_lists_checks_and_removes(run_cli, pinned: Path) -> None:
    digest = "ab" * 32
    url = "http://www.microsoft.com/pkiops/certs/Ops%20Issuing%20CA%2070.crt"
    code, out, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), "--fingerprint",
                             ":".join(digest[i:i + 2].upper() for i in range(0, 64, 2)), "--url", url,
                             "--name", "Ops Issuing CA 70", "--source", "Microsoft's CA list")
    assert code == 0, err
    assert "added: public: fingerprint pin Ops Issuing CA 70" in out
    line = (pinned / "public" / "intermediates" / "fingerprints.txt").read_text().splitlines()[-1]
    assert line == f"{digest}  {url}  # Ops Issuing CA 70"
    entry = json.loads((pinned / MANIFEST).read_text())["fingerprints"][0]
    assert (entry["digest"], entry["url"], entry["source"]) == (digest, url, "Microsoft's CA list")
    code, out, _ = run_cli("certs", "list", "--json", "--pinned-certs", str(pinned))
    [row] = json.loads(out)["fingerprintPins"]
    assert (row["name"], row["status"], row["url"], row["algorithm"]) == ("Ops Issuing CA 70", "awaiting_fetch", url,
                                                                          "sha256")
    assert "awaiting_fetch" in run_cli("certs", "list", "--pinned-certs", str(pinned))[1]
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 0, out
    assert "awaiting fetch: public: fingerprint pin Ops Issuing CA 70" in out
    assert "1 fingerprint pins awaiting fetch" in out
    before = tree_digest(pinned)
    code, out, _ = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), "--fingerprint", digest,
                           "--url", url)
    assert (code, tree_digest(pinned)) == (0, before)
    assert "already_pinned" in out
    code, out, _ = run_cli("certs", "remove", "--cloud", "public", "--pinned-certs", str(pinned), digest)
    assert code == 0, out
    trust = load_trust(pinned).for_cloud("public")
    assert trust.fingerprint_pins == ()
    assert digest in trust.removed
    assert "fingerprints" not in json.loads((pinned / MANIFEST).read_text())
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0


@pytest.mark.parametrize(("cloud", "digest", "url", "message"), [
    ("public", "ab" * 32, "http://www.example.com/ca.crt", "not on the public AIA allow-list"),
    ("public", "ab" * 32, "http://169.254.169.254/pkiops/certs/ca.crt", "not on the public AIA allow-list"),
    ("public", "ab" * 31, "http://www.microsoft.com/pkiops/certs/ca.crt", "not a SHA-256"),
    ("public", "zz" * 32, "http://www.microsoft.com/pkiops/certs/ca.crt", "not a SHA-256"),
    ("germany", "ab" * 32, "http://www.microsoft.com/pkiops/certs/ca.crt", "germany has no AIA allow-list"),
])
def test_certs_add_fingerprint_refuses_and_changes_nothing(run_cli, pinned: Path, cloud: str, digest: str, url: str,
                                                           message: str) -> None:
    before = tree_digest(pinned)
    code, _, err = run_cli("certs", "add", "--cloud", cloud, "--pinned-certs", str(pinned), "--fingerprint", digest,
                           "--url", url)
    assert code == 1
    assert message in err
    assert tree_digest(pinned) == before


def test_certs_check_names_a_fingerprint_pin_that_could_never_be_fetched(run_cli, pinned: Path) -> None:
    # Written by hand, past the checks of certs add.
    (pinned / "public" / "intermediates" / "fingerprints.txt").write_text(
        "cd" * 32 + "  http://www.example.com/ca.crt  # Ops Hand Written CA\n")
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "fingerprint: public: fingerprint pin Ops Hand Written CA" in out
    assert "not on the public AIA allow-list" in out
    assert "manifest: public:" in out  # and it has no provenance


@pytest.mark.parametrize("content", ["ab" * 32 + "  ftp://www.microsoft.com/x.crt\n", "not-a-digest  -\n",
                                     "ab" * 32 + "  http://a/b  extra\n"])
def test_a_malformed_fingerprint_list_does_not_load(run_cli, pinned: Path, content: str) -> None:
    (pinned / "public" / "intermediates" / "fingerprints.txt").write_text(content)
    code, _, err = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 2
    assert "fingerprints.txt:1" in err


def test_the_bundled_china_pins_are_its_two_issuing_cas_by_fingerprint(run_cli) -> None:
    china = load_trust(BUNDLED).for_cloud("china")
    pins = {pin.name: pin for pin in china.fingerprint_pins}
    basic = pins["DigiCert Basic RSA CN CA G2"]
    assert (basic.algorithm, basic.digest, basic.url) == (
        "sha256", "cb57b3ff2040cb269497625bc90fa9d7b4ed4938c6f60f42f69afdf508ac2993",
        "http://cacerts.digicert.cn/DigiCertBasicRSACNCAG2.crt")
    ov = pins["DigiCert Basic OV G2 TLS CN RSA4096 SHA256 2022 CA1"]
    assert (ov.algorithm, ov.digest, ov.url) == ("sha1", "60707270f2100ee2b771fec9effad8c9bffe3358", None)
    # Their issuers, DigiCert Global Root CA and G2, are China's pinned roots.
    assert {pin.subject_cn for pin in china.roots} >= {"DigiCert Global Root CA", "DigiCert Global Root G2"}
    assert AiaPolicy.azure().allowed("china", basic.url)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(BUNDLED))
    assert code == 0, out
    assert out.count("awaiting fetch: china:") == 2
