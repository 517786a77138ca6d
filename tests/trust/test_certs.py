"""``attest-service certs``: list, check, add, remove and explain, through the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.trust import MANIFEST, fingerprint, load_trust
from attest_service.verify import DocumentVerifier, VerificationPolicy
from tests.support.azure_real import real_documents

from .conftest import (
    BUNDLED,
    REPO_ROOT,
    Pki,
    make_ca,
    make_leaf,
    make_root,
    pem,
    response_json,
    sign_document,
    tree_digest,
    write_manifest,
)


def _manifest(directory: Path) -> list[dict[str, str]]:
    return json.loads((directory / MANIFEST).read_text())["certificates"]


# --- list and check -------------------------------------------------------------------------------


def test_list_json_names_every_pin_and_its_root(run_cli, pinned: Path, pki_set: Pki) -> None:
    code, out, _ = run_cli("certs", "list", "--json", "--pinned-certs", str(pinned))
    assert code == 0
    rows = {row["role"]: row for row in json.loads(out)["certificates"]}
    assert rows["intermediate"]["subject"] == "Ops Test Issuing CA 01"
    assert rows["intermediate"]["issuer"] == "Ops Test Root"
    assert rows["intermediate"]["chainsTo"] == "Ops Test Root"
    assert rows["intermediate"]["sha256"] == pki_set.issuing.certificate.fingerprint(
        pki_set.issuing.certificate.signature_hash_algorithm).hex()  # type: ignore[arg-type]
    assert rows["intermediate"]["status"] == "active"
    assert rows["root"]["source"].startswith("file:public/roots/")
    assert 360 <= rows["intermediate"]["daysLeft"] <= 365


def test_list_table_shows_bundled_pins_and_certifi_roots(run_cli) -> None:
    code, out, _ = run_cli("certs", "list", "--pinned-certs", str(BUNDLED))
    assert code == 0
    assert "DigiCert Global Root G2" in out
    assert "certifi" in out
    ocsp = next(line for line in out.splitlines() if line.startswith("public") and "G2 RSA CA OCSP 02" in line)
    assert "Microsoft TLS RSA Root G2" in ocsp  # the root it chains to


def test_check_passes_on_a_healthy_directory(run_cli, pinned: Path) -> None:
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 0, out
    assert "0 problems" in out


def test_check_bundled_pins_passes_with_retired_pins_reported_as_retired(run_cli) -> None:
    # The bundled directory keeps expired issuing CAs on purpose (verify --at of old documents), each marked
    # "retired" in its manifest: they are reported, and only --strict fails on them.
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(BUNDLED))
    assert code == 0, out
    assert "retired: public: intermediate Microsoft IT TLS CA 4" in out
    assert "retired: public: root Baltimore CyberTrust Root" in out
    assert "pins checked: 0 problems, 30 retired," in out
    code, out, _ = run_cli("certs", "check", "--strict", "--pinned-certs", str(BUNDLED))
    assert code == 1
    assert "expired: public: intermediate Microsoft IT TLS CA 4" in out
    assert "pins checked: 30 problems, 0 retired," in out


def _retire(directory: Path, subject: str, reason: str = "kept for verify --at") -> None:
    document = json.loads((directory / MANIFEST).read_text())
    for entry in document["certificates"]:
        if f"CN={subject}," in entry["subject"]:
            entry["retired"] = reason
    (directory / MANIFEST).write_text(json.dumps(document))


def _pin_expired_ca(pinned: Path, name: str, now: datetime) -> None:
    """Pin a CA that expired a year ago under a root pinned with it, so that it chains in its own validity."""
    old_root = make_root(f"{name} Root", now - timedelta(days=500))
    old = make_ca(name, old_root, now, days=30, start=now - timedelta(days=400))
    (pinned / "public" / "roots" / "old-root.pem").write_bytes(pem(old_root.certificate))
    (pinned / "public" / "intermediates" / "old.pem").write_bytes(pem(old.certificate))
    write_manifest(pinned)


def test_check_fails_on_an_expired_pin_not_marked_retired(run_cli, pinned: Path, pki_set: Pki) -> None:
    _pin_expired_ca(pinned, "Ops Old CA", pki_set.now)
    # An active pin that expired: the operator must act (the contract's certs check).
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "expired: public: intermediate Ops Old CA" in out
    assert 'mark it "retired" in manifest.json' in out
    # Marked retired: reported as retired, and the check passes; --strict still fails on it.
    _retire(pinned, "Ops Old CA", "signed the 2025 fleet")
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 0, out
    assert "retired: public: intermediate Ops Old CA" in out
    assert "(retired: signed the 2025 fleet)" in out
    code, out, _ = run_cli("certs", "check", "--json", "--pinned-certs", str(pinned))
    report = json.loads(out)
    assert (report["ok"], report["problems"], [r["subject"] for r in report["retired"]]) == (True, [], ["Ops Old CA"])
    code, out, _ = run_cli("certs", "check", "--strict", "--pinned-certs", str(pinned))
    assert code == 1
    assert "expired: public: intermediate Ops Old CA" in out


def test_check_fails_on_a_retired_pin_that_no_longer_chains(run_cli, pinned: Path, pki_set: Pki) -> None:
    now = pki_set.now
    stranger_root = make_root("Ops Gone Root", now - timedelta(days=500))
    old = make_ca("Ops Orphan CA", stranger_root, now, days=30, start=now - timedelta(days=400))
    (pinned / "public" / "intermediates" / "orphan.pem").write_bytes(pem(old.certificate))
    write_manifest(pinned)
    _retire(pinned, "Ops Orphan CA")
    # Retiring excuses the expiry only: a pin that cannot verify even old documents is a problem.
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "unchained: public: intermediate Ops Orphan CA" in out


def test_check_with_allow_retired_treats_every_expired_pin_as_retired(run_cli, pinned: Path, pki_set: Pki) -> None:
    _pin_expired_ca(pinned, "Ops Unmarked CA", pki_set.now)
    code, out, _ = run_cli("certs", "check", "--allow-retired", "--pinned-certs", str(pinned))
    assert code == 0, out
    assert "retired: public: intermediate Ops Unmarked CA" in out
    code, _, err = run_cli("certs", "check", "--allow-retired", "--strict", "--pinned-certs", str(pinned))
    assert code == 2, err


def test_check_fails_on_an_expiring_active_pin_but_not_on_a_retired_one(run_cli, pinned: Path, pki_set: Pki) -> None:
    soon = make_ca("Ops Soon CA", pki_set.root, pki_set.now, days=10)
    (pinned / "public" / "intermediates" / "soon.pem").write_bytes(pem(soon.certificate))
    write_manifest(pinned)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "expiring: public: intermediate Ops Soon CA" in out
    _retire(pinned, "Ops Soon CA")
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 0, out
    assert "retired: public: intermediate Ops Soon CA" in out


def test_check_reports_expiring_pins_within_warn_days(run_cli, pinned: Path, pki_set: Pki) -> None:
    soon = make_ca("Ops Soon Expiring CA", pki_set.root, pki_set.now, days=10)
    (pinned / "public" / "intermediates" / "soon.pem").write_bytes(pem(soon.certificate))
    write_manifest(pinned)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "expiring: public: intermediate Ops Soon Expiring CA" in out
    code, out, _ = run_cli("certs", "check", "--warn-days", "5", "--pinned-certs", str(pinned))
    assert code == 0, out


@pytest.mark.parametrize("defect", ["unchained", "not_ca", "duplicate", "expired"])
def test_check_names_each_defect(run_cli, pinned: Path, pki_set: Pki, defect: str) -> None:
    intermediates = pinned / "public" / "intermediates"
    now = pki_set.now
    if defect == "unchained":
        stranger = make_ca("Ops Stranger CA", make_root("Ops Other Root", now), now)
        (intermediates / "stranger.pem").write_bytes(pem(stranger.certificate))
        expected = "unchained: public: intermediate Ops Stranger CA"
    elif defect == "not_ca":
        leafish = make_ca("Ops Not A CA", pki_set.root, now, ca=False)
        (intermediates / "leafish.pem").write_bytes(pem(leafish.certificate))
        expected = "not_ca: public: intermediate Ops Not A CA"
    elif defect == "duplicate":
        (intermediates / "copy.pem").write_bytes(pem(pki_set.issuing.certificate))
        expected = "duplicate: public: Ops Test Issuing CA 01"
    else:
        old = make_ca("Ops Old CA", pki_set.root, now, days=30, start=now - timedelta(days=400))
        (intermediates / "old.pem").write_bytes(pem(old.certificate))
        expected = "expired: public: intermediate Ops Old CA"
    write_manifest(pinned)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert expected in out


def test_check_detects_manifest_drift_and_missing_certifi_root(run_cli, pinned: Path, pki_set: Pki) -> None:
    extra = make_ca("Ops Unrecorded CA", pki_set.root, pki_set.now)
    (pinned / "public" / "intermediates" / "unrecorded.pem").write_bytes(pem(extra.certificate))
    (pinned / "public" / "roots" / "certifi.txt").write_text("ab" * 32 + "  a root certifi never had\n")
    code, out, _ = run_cli("certs", "check", "--json", "--pinned-certs", str(pinned))
    assert code == 1
    kinds = {p["kind"]: p for p in json.loads(out)["problems"]}
    assert "unrecorded.pem" in kinds["manifest"]["message"]
    assert "ab" * 32 in kinds["certifi_missing"]["message"]


def test_check_unusable_directory_is_a_usage_error(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("certs", "check", "--pinned-certs", str(tmp_path / "absent"))
    assert code == 2
    assert "does not exist" in err


# --- add ------------------------------------------------------------------------------------------


def test_add_pins_a_valid_intermediate_and_records_it(run_cli, pinned: Path, pki_set: Pki, tmp_path: Path) -> None:
    successor = make_ca("Ops Test Issuing CA 02", pki_set.root, pki_set.now)
    source = tmp_path / "ca02.der"
    source.write_bytes(successor.certificate.public_bytes(serialization.Encoding.DER))
    code, out, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(source))
    assert code == 0, err
    assert "added: public: Ops Test Issuing CA 02" in out
    trust = load_trust(pinned)
    assert successor.certificate in trust.for_cloud("public").intermediate_certificates
    entry = next(e for e in _manifest(pinned) if e["subject"].startswith("CN=Ops Test Issuing CA 02"))
    assert entry["source"].startswith("certs add ca02.der")
    assert not list(pinned.rglob("*.tmp"))
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0
    # Adding it again changes nothing and says so.
    before = tree_digest(pinned)
    code, out, _ = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(source))
    assert code == 0
    assert "already_pinned" in out
    assert tree_digest(pinned) == before


def test_add_accepts_a_bundle_whose_members_chain_through_each_other(run_cli, pinned: Path, pki_set: Pki,
                                                                    tmp_path: Path) -> None:
    # A policy CA and the issuing CA under it, delivered together in one PEM file.
    policy_ca = pki.make_intermediate(common_name="Ops Policy CA", key=pki.new_key("ec"), issuer=pki_set.root,
                                      not_before=pki_set.now - timedelta(days=1),
                                      not_after=pki_set.now + timedelta(days=900), serial=7, path_length=1)
    issuing = make_ca("Ops Issuing Under Policy", policy_ca, pki_set.now)
    source = tmp_path / "bundle.pem"
    source.write_bytes(pem(issuing.certificate, policy_ca.certificate))
    code, _, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(source))
    assert code == 0, err
    assert len(load_trust(pinned).for_cloud("public").intermediates) == 3
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0


@pytest.mark.parametrize("case", ["leaf", "root", "other_root", "other_cloud", "expired", "garbage", "empty",
                                  "missing", "half_bad_bundle"])
def test_add_refuses_and_changes_nothing(run_cli, pinned: Path, pki_set: Pki, tmp_path: Path, case: str) -> None:
    now = pki_set.now
    cloud = "public"
    source = tmp_path / "candidate.pem"
    if case == "leaf":
        source.write_bytes(pem(pki_set.leaf.certificate))
    elif case == "root":
        source.write_bytes(pem(make_root("Ops Rogue Root", now).certificate))
    elif case == "other_root":
        source.write_bytes(pem(make_ca("Ops Rogue CA", make_root("Ops Rogue Root", now), now).certificate))
    elif case == "other_cloud":
        # A genuine CA of the public cloud offered for usgov, whose roots are not there.
        source.write_bytes(pem(make_ca("Ops Public CA", pki_set.root, now).certificate))
        cloud = "usgov"
    elif case == "expired":
        old = make_ca("Ops Old CA", pki_set.root, now, days=30, start=now - timedelta(days=400))
        source.write_bytes(pem(old.certificate))
    elif case == "garbage":
        source.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    elif case == "empty":
        source.write_bytes(b"")
    elif case == "half_bad_bundle":
        good = make_ca("Ops Good CA", pki_set.root, now)
        source.write_bytes(pem(good.certificate, pki_set.leaf.certificate))
    else:
        source = tmp_path / "absent.pem"
    before = tree_digest(pinned)
    code, out, err = run_cli("certs", "add", "--cloud", cloud, "--pinned-certs", str(pinned), str(source))
    assert code == 1, (out, err)
    assert "refused" in err
    assert tree_digest(pinned) == before


def test_add_refuses_an_unknown_cloud_as_usage(run_cli, pinned: Path, tmp_path: Path) -> None:
    code, _, _ = run_cli("certs", "add", "--cloud", "mars", "--pinned-certs", str(pinned), str(tmp_path / "x"))
    assert code == 2


# --- remove ---------------------------------------------------------------------------------------


def test_remove_by_fingerprint_and_by_file_name(run_cli, pinned: Path, pki_set: Pki, tmp_path: Path) -> None:
    second = make_ca("Ops Second CA", pki_set.root, pki_set.now)
    source = tmp_path / "second.pem"
    source.write_bytes(pem(second.certificate))
    assert run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(source))[0] == 0
    digest = fingerprint(second.certificate)
    code, out, _ = run_cli("certs", "remove", "--cloud", "public", "--pinned-certs", str(pinned), digest.upper())
    assert code == 0, out
    assert all(e["sha256"] != digest for e in _manifest(pinned))
    assert second.certificate not in load_trust(pinned).for_cloud("public").intermediate_certificates
    first = next((pinned / "public" / "intermediates").glob("*.pem")).name
    code, _, _ = run_cli("certs", "remove", "--cloud", "public", "--pinned-certs", str(pinned), first)
    assert code == 0
    assert not load_trust(pinned).for_cloud("public").intermediates
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0  # manifest still in step


def test_remove_of_an_unknown_pin_changes_nothing(run_cli, pinned: Path) -> None:
    before = tree_digest(pinned)
    for which in ("0" * 64, "nope.pem"):
        code, _, err = run_cli("certs", "remove", "--cloud", "public", "--pinned-certs", str(pinned), which)
        assert code == 1
        assert "no pinned public intermediate" in err
    # A pin of another cloud is not removed through this one.
    name = next((pinned / "public" / "intermediates").glob("*.pem")).name
    assert run_cli("certs", "remove", "--cloud", "usgov", "--pinned-certs", str(pinned), name)[0] == 1
    assert tree_digest(pinned) == before


# --- explain --------------------------------------------------------------------------------------


def test_explain_names_the_missing_issuer_and_its_aia(run_cli, pinned: Path, pki_set: Pki, leaf_key,
                                                      tmp_path: Path) -> None:
    unpinned = make_ca("Ops Issuing CA 09", pki_set.root, pki_set.now)
    url = "http://www.microsoft.com/pkiops/certs/ops-issuing-ca-09.crt"
    leaf = make_leaf(unpinned, leaf_key, pki_set.now, ca_issuers=[url])
    document = tmp_path / "document.json"
    document.write_bytes(response_json(sign_document(leaf, pki_set.now)))
    code, out, _ = run_cli("certs", "explain", "--json", "--pinned-certs", str(pinned), str(document))
    assert code == 1
    report = json.loads(out)
    assert report["error"]["code"] == "untrusted_chain"
    assert report["step"].startswith("6")
    assert report["signer"]["issuer"].startswith("CN=Ops Issuing CA 09")
    assert report["signer"]["caIssuers"] == [url]
    assert report["issuerPinned"] is False
    code, out, _ = run_cli("certs", "explain", "--pinned-certs", str(pinned), str(document))
    assert code == 1
    assert url in out
    # Once the issuer is pinned the same document verifies.
    source = tmp_path / "ca09.pem"
    source.write_bytes(pem(unpinned.certificate))
    assert run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(source))[0] == 0
    code, out, _ = run_cli("certs", "explain", "--pinned-certs", str(pinned), str(document))
    assert (code, out.strip()) == (0, "verifies: every step passed")


def test_explain_reports_non_chain_steps(run_cli, pinned: Path, pki_set: Pki, tmp_path: Path) -> None:
    document = tmp_path / "document.json"
    document.write_bytes(response_json(sign_document(pki_set.leaf, pki_set.now)))
    late = (pki_set.now + timedelta(hours=8)).isoformat()
    code, out, _ = run_cli("certs", "explain", "--json", "--at", late, "--pinned-certs", str(pinned), str(document))
    assert code == 1
    assert json.loads(out)["error"]["code"] == "document_expired"
    assert json.loads(out)["step"].startswith("8")
    document.write_bytes(b"{not json")
    code, out, _ = run_cli("certs", "explain", "--json", "--pinned-certs", str(pinned), str(document))
    assert (code, json.loads(out)["error"]["code"]) == (1, "malformed_document")


def test_explain_real_document_with_its_issuer_unpinned(run_cli, tmp_path: Path) -> None:
    documents = real_documents()
    expected = next(e for e in json.loads((documents / "expected.json").read_text())
                    if e["signer_issuer_cn"] == "Microsoft Azure RSA TLS Issuing CA 07")
    document = documents / expected["document"]
    code, out, _ = run_cli("certs", "explain", "--json", "--at", expected["verify_at"], str(document))
    assert (code, json.loads(out)["verified"]) == (0, True)
    # Without the issuing CA 07 pins, the explanation names it and where Azure publishes it.
    pins = tmp_path / "pins"
    shutil.copytree(BUNDLED, pins)
    for path in (pins / "public" / "intermediates").glob("microsoft-azure-rsa-tls-issuing-ca-07*"):
        path.unlink()
    code, out, _ = run_cli("certs", "explain", "--json", "--at", expected["verify_at"], "--pinned-certs", str(pins),
                           str(document))
    report = json.loads(out)
    assert (code, report["error"]["code"], report["issuerPinned"]) == (1, "untrusted_chain", False)
    assert "Microsoft Azure RSA TLS Issuing CA 07" in report["signer"]["issuer"]
    assert any(url.startswith("http://www.microsoft.com/pkiops/certs/") for url in report["signer"]["caIssuers"])


@pytest.mark.slow
def test_console_entry_point_runs_certs_check() -> None:
    result = subprocess.run([sys.executable, "-m", "attest_service", "certs", "check",
                             "--pinned-certs", str(BUNDLED)], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- removed.txt wins over the files --------------------------------------------------------------


def test_a_root_listed_in_removed_txt_is_not_trusted(run_cli, pinned: Path, pki_set: Pki) -> None:
    (pinned / "public" / "intermediates" / "removed.txt").write_text(
        f"{fingerprint(pki_set.root.certificate)}  # Ops Test Root, distrusted by hand\n")
    trust = load_trust(pinned).for_cloud("public")
    assert trust.roots == ()
    assert [pin.subject_cn for pin in trust.excluded] == ["Ops Test Root"]
    with pytest.raises(UntrustedChain):
        DocumentVerifier(load_trust(pinned)).verify(sign_document(pki_set.leaf, pki_set.now),
                                                    policy=VerificationPolicy(), now=pki_set.now)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "removed_pinned: public: root Ops Test Root" in out
    assert "delete its line from the list to trust it again" in out


def test_certs_remove_deletes_a_file_left_out_for_removed_txt(run_cli, pinned: Path, pki_set: Pki) -> None:
    digest = fingerprint(pki_set.issuing.certificate)
    removed = pinned / "public" / "intermediates" / "removed.txt"
    removed.write_text(f"{digest}  # listed by hand, file left in place\n")
    code, out, _ = run_cli("certs", "remove", "--cloud", "public", "--pinned-certs", str(pinned), digest)
    assert code == 0, out
    assert not list((pinned / "public" / "intermediates").glob("*.pem"))
    assert digest in load_trust(pinned).for_cloud("public").removed
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0
