"""``certs add --cloud C --from-document DOC``: pin the issuer of a document's signer, fetched or given."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.errors import ConfigurationError
from attest_service.imds import pki
from attest_service.trust import MANIFEST, fingerprint, load_trust
from attest_service.trust.issuers import AiaPolicy, AllowRule, CertificateFetcher
from attest_service.trust.pins import add_from_document, check_pins, remove_pin
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode

from .conftest import CaServer, Pki, make_ca, make_leaf, make_root, pem, response_json, sign_document, tree_digest

PREFIX = "/pkiops/certs/"


def _loopback(server: CaServer) -> tuple[AiaPolicy, CertificateFetcher]:
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
    return AiaPolicy(allow={"public": (rule,)}), CertificateFetcher(allow_address=lambda address: address.is_loopback)


def _document(ca: pki.CertifiedKey, leaf_key, now: datetime, url: str) -> bytes:  # type: ignore[no-untyped-def]
    return response_json(sign_document(make_leaf(ca, leaf_key, now, ca_issuers=[url]), now))


def test_the_issuer_is_fetched_checked_and_pinned(server: CaServer, pinned: Path, pki_set: Pki, leaf_key) -> None:
    successor = make_ca("Ops Issuing CA 81", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca81.crt", successor.certificate.public_bytes(serialization.Encoding.DER))
    document = _document(successor, leaf_key, pki_set.now, url)
    policy, fetcher = _loopback(server)
    now = datetime.now(UTC)
    pinned_doc = add_from_document(pinned, "public", document, now=now, fetcher=fetcher, policy=policy)
    assert pinned_doc.origin == url
    assert [c.action for c in pinned_doc.changes] == ["added"]
    trust = load_trust(pinned)
    assert successor.certificate in trust.for_cloud("public").intermediate_certificates
    entry = next(e for e in json.loads((pinned / MANIFEST).read_text())["certificates"]
                 if e["sha256"] == fingerprint(successor.certificate))
    assert url in entry["source"]
    assert check_pins(trust, now=now).ok
    DocumentVerifier(trust).verify(decode(document), policy=VerificationPolicy(cloud="public"),
                                   now=pki_set.now)


def test_with_an_issuer_file_from_the_command_line(run_cli, pinned: Path, pki_set: Pki, leaf_key,
                                                   tmp_path: Path) -> None:
    successor = make_ca("Ops Issuing CA 82", pki_set.root, pki_set.now)
    doc = tmp_path / "document.json"
    doc.write_bytes(_document(successor, leaf_key, pki_set.now, "http://www.microsoft.com/pkiops/certs/ca82.crt"))
    issuer = tmp_path / "ca82.crt"
    issuer.write_bytes(successor.certificate.public_bytes(serialization.Encoding.DER))
    code, out, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned),
                             "--from-document", str(doc), "--issuer", str(issuer))
    assert code == 0, err
    assert "issuer of the document's signer: Ops Issuing CA 82" in out
    assert "added: public: Ops Issuing CA 82" in out
    code, out, _ = run_cli("certs", "explain", "--pinned-certs", str(pinned), "--at", pki_set.now.isoformat(), str(doc))
    assert (code, out.strip()) == (0, "verifies: every step passed")


def test_an_old_document_still_names_its_issuer(pinned: Path, pki_set: Pki, leaf_key, tmp_path: Path) -> None:
    # Documents live six hours; the one an operator has at hand may be older. The CA is what is checked now.
    successor = make_ca("Ops Issuing CA 83", pki_set.root, pki_set.now)
    old = pki_set.now - timedelta(hours=20)
    document = response_json(sign_document(make_leaf(successor, leaf_key, pki_set.now), old))
    changes = add_from_document(pinned, "public", document, now=datetime.now(UTC), issuer=pem(successor.certificate))
    assert [c.action for c in changes.changes] == ["added"]


def test_the_command_line_fetch_keeps_the_address_guard(run_cli, server: CaServer, pinned: Path, pki_set: Pki,
                                                        leaf_key, tmp_path: Path) -> None:
    # Run as an operator runs it: the default fetcher refuses loopback (and every non-public address),
    # here already at the allow-list, which names only Microsoft's and DigiCert's repositories.
    successor = make_ca("Ops Issuing CA 84", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca84.crt", successor.certificate.public_bytes(serialization.Encoding.DER))
    doc = tmp_path / "document.json"
    doc.write_bytes(_document(successor, leaf_key, pki_set.now, url))
    before = tree_digest(pinned)
    code, _, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned),
                           "--from-document", str(doc))
    assert code == 1
    assert "not_allowed" in err
    assert server.hits[PREFIX + "ca84.crt"] == 0
    assert tree_digest(pinned) == before


def test_the_library_fetch_refuses_loopback_by_default(server: CaServer, pinned: Path, pki_set: Pki,
                                                       leaf_key) -> None:
    successor = make_ca("Ops Issuing CA 85", pki_set.root, pki_set.now)
    url = server.publish(PREFIX + "ca85.crt", successor.certificate.public_bytes(serialization.Encoding.DER))
    policy, _ = _loopback(server)
    with pytest.raises(ConfigurationError, match="address_refused"):
        add_from_document(pinned, "public", _document(successor, leaf_key, pki_set.now, url), now=datetime.now(UTC),
                          policy=policy)
    assert server.hits[PREFIX + "ca85.crt"] == 0


@pytest.mark.parametrize("case", ["impostor", "other_root", "not_the_issuer", "other_cloud", "removed",
                                  "organisation", "not_a_document"])
def test_refusals_change_nothing(server: CaServer, pinned: Path, pki_set: Pki, leaf_key, case: str) -> None:
    now = pki_set.now
    policy, fetcher = _loopback(server)
    successor = make_ca("Ops Issuing CA 86", pki_set.root, now)
    url = server.url(PREFIX + "ca86.crt")
    document = _document(successor, leaf_key, now, url)
    issuer: bytes | None = pem(successor.certificate)
    cloud = "public"
    message = ""
    if case == "impostor":
        # The forger's document names the real CA; the real CA did not sign the forger's signer.
        impostor = make_ca("Ops Issuing CA 86", make_root("Ops Forger Root", now), now)
        document = _document(impostor, leaf_key, now, url)
        message = "did not issue"
    elif case == "other_root":
        rogue = make_ca("Ops Issuing CA 86", make_root("Ops Rogue Root", now), now)
        document, issuer, message = _document(rogue, leaf_key, now, url), pem(rogue.certificate), "does not chain"
    elif case == "not_the_issuer":
        issuer, message = pem(make_ca("Ops Issuing CA 87", pki_set.root, now).certificate), "holds no certificate"
    elif case == "other_cloud":
        cloud, message = "usgov", "does not chain"
    elif case == "removed":
        server.publish(PREFIX + "ca86.crt", successor.certificate.public_bytes(serialization.Encoding.DER))
        add_from_document(pinned, "public", document, now=datetime.now(UTC), fetcher=fetcher, policy=policy)
        remove_pin(pinned, "public", fingerprint(successor.certificate))
        issuer, message = None, "removed"
    elif case == "organisation":
        server.publish(PREFIX + "ca86.crt", successor.certificate.public_bytes(serialization.Encoding.DER))
        policy = AiaPolicy(allow=policy.allow, organizations={"public": ("Contoso Ltd",)})
        issuer, message = None, "organisation"
    else:
        document, message = b'{"encoding": "pkcs7", "signature": "bm90IGEgZG9jdW1lbnQ="}', "not an attested document"
    before = tree_digest(pinned)
    with pytest.raises(ConfigurationError, match=message):
        add_from_document(pinned, cloud, document, now=datetime.now(UTC), issuer=issuer, fetcher=fetcher, policy=policy)
    assert tree_digest(pinned) == before


def test_a_document_of_another_cloud_is_refused(pinned: Path, pki_set: Pki, leaf_key) -> None:
    # The signer's name is the name rule's business (step 5): a public signer does not pin a china CA.
    successor = make_ca("Ops Issuing CA 88", pki_set.root, pki_set.now)
    pki.write_pinned_dir(pinned, "china", root=pki_set.root.certificate, intermediates=[])
    document = response_json(sign_document(make_leaf(successor, leaf_key, pki_set.now), pki_set.now))
    with pytest.raises(ConfigurationError, match="subject_mismatch"):
        add_from_document(pinned, "china", document, now=datetime.now(UTC), issuer=pem(successor.certificate))


@pytest.mark.parametrize("argv", [
    ["FILE", "--from-document", "DOC"],
    ["--from-document", "DOC", "--fingerprint", "ab" * 32],
    ["--issuer", "ISSUER"],
    ["FILE", "--url", "http://www.microsoft.com/pkiops/certs/x.crt"],
    [],
])
def test_the_forms_of_certs_add_do_not_mix(run_cli, pinned: Path, argv: list[str]) -> None:
    before = tree_digest(pinned)
    code, _, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), *argv)
    assert code == 2, err
    assert tree_digest(pinned) == before



# --- --issuer FILE pins the signer's issuer and nothing else ------------------------------------------


def _issuer_case(pinned: Path, leaf_key, tmp_path: Path, ca: pki.CertifiedKey,  # type: ignore[no-untyped-def]
                 *others: pki.CertifiedKey) -> tuple[Path, Path]:
    """A document signed under ``ca`` and an issuer file holding ``others`` (in that order)."""
    doc = tmp_path / "document.json"
    doc.write_bytes(response_json(sign_document(make_leaf(ca, leaf_key, datetime.now(UTC)), datetime.now(UTC))))
    issuer = tmp_path / "issuer.pem"
    issuer.write_bytes(pem(*(other.certificate for other in others)))
    return doc, issuer


def test_only_the_issuer_of_the_signer_is_pinned_from_the_issuer_file(run_cli, pinned: Path, pki_set: Pki, leaf_key,
                                                                     tmp_path: Path) -> None:
    # The file also holds another valid CA under the pinned root: it used to be pinned with the issuer.
    successor = make_ca("Ops Issuing CA 91", pki_set.root, pki_set.now)
    extra = make_ca("Ops Unrelated CA 92", pki_set.root, pki_set.now)
    doc, issuer = _issuer_case(pinned, leaf_key, tmp_path, successor, extra, successor)
    code, out, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned),
                             "--from-document", str(doc), "--issuer", str(issuer))
    assert code == 0, err
    assert "added: public: Ops Issuing CA 91" in out
    assert f"note: Ops Unrelated CA 92 (sha256 {fingerprint(extra.certificate)}) in issuer.pem" in err
    pins = load_trust(pinned).for_cloud("public").intermediate_certificates
    assert successor.certificate in pins
    assert extra.certificate not in pins
    recorded = {e["sha256"] for e in json.loads((pinned / MANIFEST).read_text())["certificates"]}
    assert fingerprint(extra.certificate) not in recorded
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0


def test_an_impostor_of_the_issuers_name_in_the_file_is_passed_over(pinned: Path, pki_set: Pki, leaf_key,
                                                                    tmp_path: Path) -> None:
    # Same subject, another key, chaining to the pinned root: its name alone does not make it the issuer.
    successor = make_ca("Ops Issuing CA 93", pki_set.root, pki_set.now)
    impostor = make_ca("Ops Issuing CA 93", pki_set.root, pki_set.now)
    doc, issuer = _issuer_case(pinned, leaf_key, tmp_path, successor, impostor, successor)
    pinned_doc = add_from_document(pinned, "public", doc.read_bytes(), now=datetime.now(UTC),
                                   issuer=issuer.read_bytes(), issuer_origin="issuer.pem")
    assert [c.sha256 for c in pinned_doc.changes] == [fingerprint(successor.certificate)]
    assert pinned_doc.ignored == (f"Ops Issuing CA 93 (sha256 {fingerprint(impostor.certificate)})",)
    assert impostor.certificate not in load_trust(pinned).for_cloud("public").intermediate_certificates


@pytest.mark.parametrize("case", ["impostor_and_stranger", "chain_only_in_the_file"])
def test_an_issuer_file_without_the_signers_issuer_is_refused(run_cli, pinned: Path, pki_set: Pki, leaf_key,
                                                              tmp_path: Path, case: str) -> None:
    now = pki_set.now
    if case == "impostor_and_stranger":
        successor = make_ca("Ops Issuing CA 94", pki_set.root, now)
        offered = [make_ca("Ops Issuing CA 94", pki_set.root, now), make_ca("Ops Unrelated CA 95", pki_set.root, now)]
        message = "holds no certificate that issued the document's signer"
    else:
        # The issuer chains to the root only through a policy CA the file carries, which is not pinned and,
        # since only the issuer is pinned now, is not used either: pin the policy CA first.
        policy_ca = pki.make_intermediate(common_name="Ops Policy CA 96", key=pki.new_key("ec"), issuer=pki_set.root,
                                          not_before=now - timedelta(days=1), not_after=now + timedelta(days=900),
                                          serial=96, path_length=1)
        successor = make_ca("Ops Issuing CA 97", policy_ca, now)
        offered = [successor, policy_ca]
        message = "does not chain to a public root"
    doc, issuer = _issuer_case(pinned, leaf_key, tmp_path, successor, *offered)
    before = tree_digest(pinned)
    code, _, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned),
                           "--from-document", str(doc), "--issuer", str(issuer))
    assert code == 1
    assert "refused" in err
    assert message in err
    assert tree_digest(pinned) == before
