"""Revocation: CRLs of the trust directory, checked against the pins, looked up after the path is built."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import REGISTRY

from attest_service import Verifier as LibraryVerifier
from attest_service.errors import CertificateRevoked, ConfigurationError, RevocationUnknown
from attest_service.imds import pki
from attest_service.settings import Settings
from attest_service.trust import load_trust
from attest_service.trust.crls import check_crls
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import DocumentVerifier, VerificationPolicy
from tests.support import crls

from .conftest import DAY, Pki, make_ca, make_root, response_json, sign_document

SOFT, HARD, OFF = (VerificationPolicy(revocation=mode) for mode in ("soft", "hard", "off"))


def _write(directory: Path, cloud: str, name: str, data: bytes) -> Path:
    folder = directory / cloud / "crls"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _verify(directory: Path, pki_set: Pki, policy: VerificationPolicy, document: bytes | None = None):  # type: ignore[no-untyped-def]
    document = document if document is not None else sign_document(pki_set.leaf, pki_set.now)
    return DocumentVerifier(load_trust(directory)).verify(document, policy=policy, now=pki_set.now)


def _both_current(directory: Path, pki_set: Pki, *, leaf_revoked: bool = False, ca_revoked: bool = False) -> None:
    """A current CRL of the issuing CA (DER) and of the root (PEM), listing what is asked."""
    leaf_serials = [pki_set.leaf.certificate.serial_number] if leaf_revoked else []
    ca_serials = [pki_set.issuing.certificate.serial_number] if ca_revoked else []
    _write(directory, "public", "issuing.crl",
           crls.der(crls.make_crl(pki_set.issuing, revoked=[12345, *leaf_serials], now=pki_set.now)))
    _write(directory, "public", "root.crl", crls.pem(crls.make_crl(pki_set.root, revoked=ca_serials, now=pki_set.now)))


# --- the lookup -----------------------------------------------------------------------------------------


def test_current_crls_not_listing_the_path_accept_even_in_hard_mode(pinned: Path, pki_set: Pki) -> None:
    _both_current(pinned, pki_set)
    result = _verify(pinned, pki_set, HARD)
    assert result.revocation_unknown == 0
    assert {crl.source for crl in load_trust(pinned).for_cloud("public").crls} == {"public/crls/issuing.crl",
                                                                                  "public/crls/root.crl"}


@pytest.mark.parametrize("policy", [SOFT, HARD], ids=["soft", "hard"])
def test_revoked_leaf_is_refused(pinned: Path, pki_set: Pki, policy: VerificationPolicy) -> None:
    _both_current(pinned, pki_set, leaf_revoked=True)
    with pytest.raises(CertificateRevoked, match=r"metadata\.azure\.com.*public/crls/issuing\.crl") as caught:
        _verify(pinned, pki_set, policy)
    assert caught.value.code == "certificate_revoked"


def test_revoked_intermediate_is_refused_from_the_roots_pem_crl(pinned: Path, pki_set: Pki) -> None:
    _both_current(pinned, pki_set, ca_revoked=True)
    with pytest.raises(CertificateRevoked, match=r"Ops Test Issuing CA 01.*public/crls/root\.crl"):
        _verify(pinned, pki_set, SOFT)


def test_off_does_not_look_at_crls(pinned: Path, pki_set: Pki) -> None:
    _both_current(pinned, pki_set, leaf_revoked=True, ca_revoked=True)
    assert _verify(pinned, pki_set, OFF).claims.nonce == "ops-test-nonce"


def test_without_crls_soft_accepts_and_counts_hard_refuses(pinned: Path, pki_set: Pki) -> None:
    # Leaf and issuing CA: two certificates whose status nothing tells.
    assert _verify(pinned, pki_set, SOFT).revocation_unknown == 2
    with pytest.raises(RevocationUnknown, match=r"Ops Test Issuing CA 01|metadata\.azure\.com") as caught:
        _verify(pinned, pki_set, HARD)
    assert caught.value.code == "revocation_unknown"


@pytest.mark.parametrize("window", ["expired", "not yet current"])
def test_crl_outside_its_window_does_not_count(pinned: Path, pki_set: Pki, window: str) -> None:
    now = pki_set.now
    hour = timedelta(hours=1)
    this_update, next_update = ((now - 20 * hour, now - hour) if window == "expired" else (now + hour, now + 8 * DAY))
    revoked = [pki_set.leaf.certificate.serial_number]
    _write(pinned, "public", "issuing.crl", crls.der(crls.make_crl(
        pki_set.issuing, revoked=revoked, now=now, this_update=this_update, next_update=next_update)))
    _write(pinned, "public", "root.crl", crls.der(crls.make_crl(pki_set.root, now=now)))
    # Not current: the listing it holds is not applied, and the leaf's status is unknown.
    assert _verify(pinned, pki_set, SOFT).revocation_unknown == 1
    with pytest.raises(RevocationUnknown, match=r"metadata\.azure\.com"):
        _verify(pinned, pki_set, HARD)
    # At an instant inside its window the same CRL refuses the leaf.
    inside = this_update + timedelta(hours=1)
    document = sign_document(pki_set.leaf, inside)
    with pytest.raises(CertificateRevoked):
        DocumentVerifier(load_trust(pinned)).verify(document, policy=SOFT, now=inside)


def test_a_newer_crl_beside_an_older_one_is_used(pinned: Path, pki_set: Pki) -> None:
    now = pki_set.now
    _write(pinned, "public", "root.crl", crls.der(crls.make_crl(pki_set.root, now=now)))
    _write(pinned, "public", "issuing-old.crl", crls.der(crls.make_crl(
        pki_set.issuing, now=now, this_update=now - 9 * DAY, next_update=now - DAY)))
    _write(pinned, "public", "issuing-new.crl", crls.der(crls.make_crl(
        pki_set.issuing, revoked=[pki_set.leaf.certificate.serial_number], now=now, number=2)))
    with pytest.raises(CertificateRevoked, match=r"issuing-new\.crl"):
        _verify(pinned, pki_set, SOFT)


# --- CRLs that are never used -------------------------------------------------------------------------


def _check(run_cli: Callable[..., tuple[int, str, str]], directory: Path, *extra: str) -> tuple[int, dict[str, object]]:
    code, out, _ = run_cli("certs", "check", "--json", "--pinned-certs", str(directory), *extra)
    return code, json.loads(out)


def test_forged_crl_is_not_used_and_certs_check_names_it(pinned: Path, pki_set: Pki, run_cli) -> None:
    _both_current(pinned, pki_set)
    # Same issuer name, another key: a CRL anyone could make, revoking the genuine leaf.
    forged = crls.make_crl(pki_set.issuing, revoked=[pki_set.leaf.certificate.serial_number], now=pki_set.now,
                           key=pki.new_key("ec"), number=9)
    _write(pinned, "public", "forged.crl", crls.der(forged))
    assert _verify(pinned, pki_set, HARD).revocation_unknown == 0
    code, report = _check(run_cli, pinned)
    assert code == 1
    assert report["ok"] is False
    [problem] = report["crlProblems"]
    assert problem.startswith("public/crls/forged.crl: not used: ")
    assert "does not verify" in problem


def test_forged_crl_alone_leaves_the_status_unknown(pinned: Path, pki_set: Pki) -> None:
    # A forger cannot stand in for the missing CRL either: hard mode still refuses.
    forged = crls.make_crl(pki_set.issuing, now=pki_set.now, key=pki.new_key("ec"))
    _write(pinned, "public", "issuing.crl", crls.der(forged))
    _write(pinned, "public", "root.crl", crls.der(crls.make_crl(pki_set.root, now=pki_set.now)))
    with pytest.raises(RevocationUnknown):
        _verify(pinned, pki_set, HARD)


def test_crl_of_another_cloud_is_not_used(tmp_path: Path, pinned: Path, pki_set: Pki, run_cli) -> None:
    other_root = make_root("Gov Test Root", pki_set.now)
    pki.write_pinned_dir(pinned, "usgov", root=other_root.certificate,
                         intermediates=[make_ca("Gov Test Issuing CA", other_root, pki_set.now).certificate])
    # The public issuing CA's genuine CRL, dropped into usgov's folder: no usgov pin issued it.
    _write(pinned, "usgov", "public-issuing.crl", crls.der(crls.make_crl(
        pki_set.issuing, revoked=[pki_set.leaf.certificate.serial_number], now=pki_set.now)))
    trust = load_trust(pinned)
    assert trust.for_cloud("usgov").crls == ()
    assert trust.for_cloud("public").crls == ()
    assert _verify(pinned, pki_set, SOFT).revocation_unknown == 2
    code, report = _check(run_cli, pinned)
    assert code == 1
    assert any(p.startswith("usgov/crls/public-issuing.crl: not used: ") and "not a pinned CA of usgov" in p
               for p in report["crlProblems"])  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("truncated.crl", b"0\x82\x10\x00\x01\x02", "not a CRL"),
    ("text.crl", b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n", "not a CRL"),
    ("issuing.der", b"whatever", "only *.crl files"),
])
def test_malformed_files_are_named(pinned: Path, pki_set: Pki, run_cli, name: str, data: bytes, reason: str) -> None:
    _write(pinned, "public", name, data)
    trust = load_trust(pinned)  # never fails the load: the pins keep working
    assert trust.for_cloud("public").crls == ()
    code, report = _check(run_cli, pinned)
    assert code == 1
    [problem] = report["crlProblems"]
    assert problem.startswith(f"public/crls/{name}: not used: ")
    assert reason in problem


def test_delta_and_indirect_crls_are_not_used(pinned: Path, pki_set: Pki) -> None:
    now = pki_set.now
    _write(pinned, "public", "delta.crl", crls.der(crls.make_crl(
        pki_set.issuing, now=now, extensions=[(x509.DeltaCRLIndicator(1), True)])))
    _write(pinned, "public", "indirect.crl", crls.der(crls.make_crl(pki_set.issuing, now=now, extensions=[(
        x509.IssuingDistributionPoint(full_name=None, relative_name=None, only_contains_user_certs=False,
                                      only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=True,
                                      only_contains_attribute_certs=False), True)])))
    problems = load_trust(pinned).for_cloud("public").crl_problems
    assert any("delta.crl" in p and "delta CRL" in p for p in problems)
    assert any("indirect.crl" in p and "indirect CRL" in p for p in problems)


def test_partitioned_crl_covers_only_its_partition(pinned: Path, pki_set: Pki, leaf_key) -> None:  # type: ignore[no-untyped-def]
    """Azure's G2 CAs publish partitioned CRLs: one covers only the leaves naming its URL."""
    partition = "http://www.microsoft.com/pkiops/crl/partition/Test_Partition00045.crl"
    leaf = _leaf_with_crl_url(pki_set, leaf_key, partition)
    idp = x509.IssuingDistributionPoint(full_name=[x509.UniformResourceIdentifier(partition)], relative_name=None,
                                        only_contains_user_certs=True, only_contains_ca_certs=False,
                                        only_some_reasons=None, indirect_crl=False,
                                        only_contains_attribute_certs=False)
    _write(pinned, "public", "partition45.crl", crls.der(crls.make_crl(pki_set.issuing, now=pki_set.now,
                                                                       extensions=[(idp, True)])))
    _write(pinned, "public", "root.crl", crls.der(crls.make_crl(pki_set.root, now=pki_set.now)))
    assert _verify(pinned, pki_set, HARD, sign_document(leaf, pki_set.now)).revocation_unknown == 0
    # The fixture's leaf names no partition: that CRL does not cover it.
    with pytest.raises(RevocationUnknown):
        _verify(pinned, pki_set, HARD)


def _leaf_with_crl_url(pki_set: Pki, key, url: str) -> pki.CertifiedKey:  # type: ignore[no-untyped-def]
    cert = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                         common_name="metadata.azure.com", key=key, issuer=pki_set.issuing,
                         not_before=pki_set.now - DAY, not_after=pki_set.now + 30 * DAY,
                         serial=x509.random_serial_number()).certificate
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier(url)], None, None, None)]), critical=False)
    return pki.CertifiedKey(certificate=builder.sign(pki_set.issuing.private_key, hashes.SHA256()), private_key=key)


# --- certs check's warnings ---------------------------------------------------------------------------


def test_certs_check_warns_of_a_crl_past_or_near_its_next_update(pinned: Path, pki_set: Pki, run_cli) -> None:
    now = pki_set.now
    _write(pinned, "public", "issuing.crl", crls.der(crls.make_crl(pki_set.issuing, now=now,
                                                                   next_update=now + timedelta(hours=20))))
    _write(pinned, "public", "root.crl", crls.der(crls.make_crl(pki_set.root, now=now, this_update=now - 9 * DAY,
                                                                next_update=now - DAY)))
    code, report = _check(run_cli, pinned)
    assert code == 0, report
    warnings = report["crlWarnings"]
    assert any("public/crls/issuing.crl" in w and "within a day" in w for w in warnings)  # type: ignore[union-attr]
    assert any("public/crls/root.crl" in w and "past its nextUpdate" in w for w in warnings)  # type: ignore[union-attr]
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 0
    assert "warning: crl: public/crls/root.crl" in out
    earlier = check_crls(load_trust(pinned), now=now - 3 * DAY).warnings
    assert len(earlier) == 1
    assert "public/crls/issuing.crl" in earlier[0]
    assert "current only from" in earlier[0]


# --- the command line, the library and the setting -----------------------------------------------------


def test_verify_command_takes_the_revocation_mode(tmp_path: Path, pinned: Path, pki_set: Pki, run_cli) -> None:
    _both_current(pinned, pki_set, leaf_revoked=True)
    document = tmp_path / "document.json"
    document.write_bytes(response_json(sign_document(pki_set.leaf, pki_set.now)))
    common = ("verify", "--pinned-certs", str(pinned), "--at", pki_set.now.isoformat())
    code, out, _ = run_cli(*common, str(document))
    assert (code, json.loads(out)["error"]["code"]) == (1, "certificate_revoked")
    code, out, _ = run_cli(*common, "--revocation", "off", str(document))
    assert (code, json.loads(out)["verified"]) == (0, True)
    for path in (pinned / "public" / "crls").iterdir():
        path.unlink()
    code, out, _ = run_cli(*common, "--revocation", "hard", str(document))
    assert (code, json.loads(out)["error"]["code"]) == (1, "revocation_unknown")
    code, _, err = run_cli(*common, "--revocation", "maybe", str(document))
    assert code == 2
    assert "--revocation" in err


def test_library_verify_response_takes_the_revocation_mode(pinned: Path, pki_set: Pki) -> None:
    _both_current(pinned, pki_set, leaf_revoked=True)
    verifier = LibraryVerifier.from_directory(pinned)
    response = response_json(sign_document(pki_set.leaf, pki_set.now))
    with pytest.raises(CertificateRevoked):
        verifier.verify_response(response, at=pki_set.now)
    assert verifier.verify_response(response, at=pki_set.now, revocation="off").cloud == "public"
    with pytest.raises(ValueError, match="revocation"):
        verifier.verify_response(response, at=pki_set.now, revocation="loose")  # type: ignore[arg-type]


def test_setting_is_validated_at_start() -> None:
    assert Settings.from_env({}).revocation == "soft"
    assert Settings.from_env({"ATTEST_REVOCATION": "hard"}).revocation == "hard"
    with pytest.raises(ConfigurationError, match="ATTEST_REVOCATION"):
        Settings.from_env({"ATTEST_REVOCATION": "strict"})


# --- reload and metrics ----------------------------------------------------------------------------------


def _sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_dropped_crl_is_picked_up_by_the_reload_and_exported(pinned: Path, pki_set: Pki) -> None:
    moment = [0.0]
    holder = ReloadingVerifier(pinned, interval_seconds=5, clock=lambda: moment[0])
    document = sign_document(pki_set.leaf, pki_set.now)
    cloud = {"cloud": "public"}
    unknown = _sample("attest_revocation_unknown_total", cloud) or 0.0
    holder.verify(document, policy=SOFT, now=pki_set.now)
    assert _sample("attest_revocation_unknown_total", cloud) == unknown + 1
    _both_current(pinned, pki_set, leaf_revoked=True)
    holder.verify(document, policy=SOFT, now=pki_set.now)  # before the interval: the old trust
    moment[0] = 6.0
    with pytest.raises(CertificateRevoked):
        holder.verify(document, policy=SOFT, now=pki_set.now)
    labels = {"cloud": "public", "issuer": "Ops Test Issuing CA 01", "file": "public/crls/issuing.crl"}
    crl = next(c for c in holder.trust.for_cloud("public").crls if c.source == "public/crls/issuing.crl")
    assert _sample("attest_crl_next_update_timestamp_seconds", labels) == crl.next_update.timestamp()
    # Taken out again: the CRL disappears from the metrics and the leaf is accepted (soft) once more.
    (pinned / "public" / "crls" / "issuing.crl").unlink()
    moment[0] = 12.0
    holder.verify(document, policy=SOFT, now=pki_set.now)
    assert _sample("attest_crl_next_update_timestamp_seconds", labels) is None


def test_no_crl_file_makes_the_load_fail_whatever_its_bytes(pinned: Path, pki_set: Pki) -> None:
    """Mutated CRLs (a version cryptography does not know, cut or grown fields) are reported, never raised."""
    genuine = crls.der(crls.make_crl(pki_set.issuing, revoked=[1, 2, 3], now=pki_set.now))
    tbs_version = genuine.index(b"\x02\x01\x01")  # the first INTEGER: TBSCertList's version, v2
    mutations = [genuine[:tbs_version] + b"\x02\x01\x06" + genuine[tbs_version + 3:]]
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(genuine)
        position = rng.randrange(len(data))
        if rng.random() < 0.5:
            data[position] = rng.randrange(256)
        else:
            del data[position:position + rng.randint(1, 8)]
        mutations.append(bytes(data))
    folder = pinned / "public" / "crls"
    folder.mkdir(parents=True)
    for number, data in enumerate(mutations):
        (folder / f"mutated-{number:03}.crl").write_bytes(data)
    trust = load_trust(pinned).for_cloud("public")
    assert len(trust.crls) + len(trust.crl_problems) == len(mutations)
    assert any("mutated-000.crl: not used: " in p and "version" in p for p in trust.crl_problems)


def test_a_crl_not_used_is_logged_and_counted_by_the_reload(pinned: Path, pki_set: Pki,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _write(pinned, "public", "forged.crl", crls.der(crls.make_crl(pki_set.issuing, now=pki_set.now,
                                                                  key=pki.new_key("ec"))))
    with caplog.at_level("WARNING", logger="attest_service"):
        ReloadingVerifier(pinned, interval_seconds=5)
    assert REGISTRY.get_sample_value("attest_trust_problems") == 1
    assert any("public/crls/forged.crl: not used" in record.getMessage() for record in caplog.records)


def test_a_ca_without_crl_sign_cannot_issue_a_crl_that_counts(tmp_path: Path, pki_set: Pki, leaf_key) -> None:  # type: ignore[no-untyped-def]
    """keyUsage without cRLSign: the CA's key may sign certificates, and its CRLs are not used (RFC 5280 4.2.1.3)."""
    now = pki_set.now
    key = pki.new_key("ec")
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "No CRL Sign CA")])
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(pki_set.root.certificate.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(usage, critical=True)
                   .sign(pki_set.root.private_key, hashes.SHA256()))
    ca = pki.CertifiedKey(certificate=certificate, private_key=key)
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "public", root=pki_set.root.certificate, intermediates=[certificate])
    _write(directory, "public", "no-crl-sign.crl", crls.der(crls.make_crl(ca, revoked=[5], now=now)))
    trust = load_trust(directory).for_cloud("public")
    assert trust.crls == ()
    [problem] = trust.crl_problems
    assert problem.startswith("public/crls/no-crl-sign.crl: not used: ")
    assert "cRLSign" in problem
