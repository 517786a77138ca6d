"""Hot reload of the pinned directory by ReloadingVerifier, and the trust metrics."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from attest_service.errors import ConfigurationError, SignatureInvalid, UntrustedChain
from attest_service.imds import pki
from attest_service.trust import fingerprint, load_trust
from attest_service.trust.pins import add_pins, remove_pin
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy

from .conftest import (
    Pki,
    digicert_name,
    make_ca,
    make_leaf,
    make_named_ca,
    make_root,
    pem,
    sign_document,
    tree_digest,
)

POLICY = VerificationPolicy()


class FakeClock:
    """A monotonic clock the test moves by hand, so interval logic is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _add(pinned: Path, certificate) -> None:  # type: ignore[no-untyped-def]
    add_pins(pinned, "public", pem(certificate), origin="test.pem", now=datetime.now(UTC))


def test_new_pin_is_seen_after_the_interval_and_not_before(pinned: Path, pki_set: Pki, leaf_key) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=clock)
    successor = make_ca("Ops Test Issuing CA 02", pki_set.root, pki_set.now)
    document = sign_document(make_leaf(successor, leaf_key, pki_set.now), pki_set.now)
    # The registry is the process's: other tests count too, so this one compares its own before and after.
    counted = _sample("attest_verifications_by_issuer_total", issuer="Ops Test Issuing CA 02")
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert _sample("attest_verifications_by_issuer_total", issuer="Ops Test Issuing CA 02") == counted
    first = holder.verifier()
    _add(pinned, successor.certificate)
    clock.now += 9
    assert holder.verifier() is first  # inside the interval nothing is looked at
    clock.now += 1
    assert holder.verifier() is not first
    result = holder.verify(document, policy=POLICY, now=pki_set.now)
    assert result.signer.issuer.startswith("CN=Ops Test Issuing CA 02")
    assert _sample("attest_verifications_by_issuer_total", issuer="Ops Test Issuing CA 02") == counted + 1


def test_unchanged_directory_keeps_the_same_verifier(pinned: Path) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    first = holder.verifier()
    successes = _sample("attest_trust_reload_total", result="success")
    clock.now += 5
    assert holder.verifier() is first
    assert _sample("attest_trust_reload_total", result="success") == successes


def test_broken_directory_keeps_the_last_good_trust(pinned: Path, pki_set: Pki,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    good = holder.verifier()
    failures = _sample("attest_trust_reload_total", result="failure")
    garbage = pinned / "public" / "intermediates" / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with caplog.at_level(logging.ERROR, logger="attest_service.trust.reload"):
        for _ in range(3):
            clock.now += 1
            assert holder.verifier() is good
    assert holder.failing
    assert _sample("attest_trust_reload_failing") == 1
    assert _sample("attest_trust_reload_total", result="failure") == failures + 1  # same content: tried once
    assert len([r for r in caplog.records if "keeping the last good trust" in r.getMessage()]) == 1
    # Documents keep verifying with the last good trust meanwhile.
    holder.verify(sign_document(pki_set.leaf, pki_set.now), policy=POLICY, now=pki_set.now)
    garbage.unlink()
    clock.now += 1
    holder.verifier()
    assert not holder.failing
    assert _sample("attest_trust_reload_failing") == 0


def test_removed_directory_keeps_the_last_good_trust(pinned: Path, tmp_path: Path) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    good = holder.verifier()
    moved = tmp_path / "moved"
    pinned.rename(moved)
    clock.now += 1
    assert holder.verifier() is good
    assert holder.failing
    moved.rename(pinned)
    clock.now += 1
    holder.verifier()
    assert not holder.failing


def test_request_reload_forces_a_load(pinned: Path) -> None:
    holder = ReloadingVerifier(pinned, interval_seconds=30, clock=FakeClock())
    first = holder.verifier()
    holder.request_reload()
    assert holder.verifier() is not first


def test_start_up_without_trust_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        ReloadingVerifier(tmp_path / "absent", interval_seconds=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no pinned certificate"):
        ReloadingVerifier(tmp_path / "empty", interval_seconds=1)


def test_pinned_expiry_gauges_follow_the_trust(pinned: Path, pki_set: Pki) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    issuing = pki_set.issuing.certificate
    labels = {"cloud": "public", "role": "intermediate", "subject": "Ops Test Issuing CA 01",
              "sha256": fingerprint(issuing)}
    assert _sample("attest_pinned_certificate_not_after_seconds", **labels) == issuing.not_valid_after_utc.timestamp()
    remove_pin(pinned, "public", fingerprint(issuing))
    clock.now += 1
    holder.verifier()
    assert REGISTRY.get_sample_value("attest_pinned_certificate_not_after_seconds", labels) is None


def _rotation_document(pki_set: Pki, leaf_key, name: str, *, url: str | None = None,  # type: ignore[no-untyped-def]
                       root=None, carry: bool = False) -> bytes:
    """A document under a new issuing CA ``name``, its signer naming ``url`` (default: Microsoft's repository).

    With ``carry`` the document carries the CA beside the signer (Azure's carry none).
    """
    ca = make_ca(name, root or pki_set.root, pki_set.now)
    slug = name.lower().replace(" ", "-")
    urls = [url if url is not None else f"http://www.microsoft.com/pkiops/certs/{slug}.crt"] if url != "" else []
    leaf = make_leaf(ca, leaf_key, pki_set.now, ca_issuers=urls)
    if not carry:
        return sign_document(leaf, pki_set.now)
    content = pki.attested_content(nonce="ops-test-nonce", vm_id="00000000-0000-0000-0000-000000000001",
                                   subscription_id="00000000-0000-0000-0000-000000000002", sku="sku",
                                   plan=("", "", ""), license_type="", created_on=pki_set.now,
                                   expires_on=pki_set.now)
    return pki.sign_attested(content, signer=leaf, extra_certificates=[ca.certificate])


def test_unpinned_issuer_is_counted_and_logged_with_its_url(pinned: Path, pki_set: Pki, leaf_key,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    document = _rotation_document(pki_set, leaf_key, "Ops Rotation CA 77", carry=True)
    before = _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 77")
    with caplog.at_level(logging.WARNING, logger="attest_service.trust.reload"):
        for _ in range(3):
            with pytest.raises(UntrustedChain):
                holder.verify(document, policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 77") == before + 3
    lines = [r.getMessage() for r in caplog.records if "unpinned issuing CA" in r.getMessage()]
    assert len(lines) == 1, lines  # once per issuer and interval, not once per document
    assert "CN=Ops Rotation CA 77" in lines[0]
    assert "http://www.microsoft.com/pkiops/certs/ops-rotation-ca-77.crt" in lines[0]
    assert "certs add --cloud public --from-document" in lines[0]


def test_forged_issuer_names_cannot_take_the_labels_of_a_real_rotation(pinned: Path, pki_set: Pki,
                                                                      leaf_key) -> None:
    # Anyone can sign a document whose signer names any issuer: a stream of made-up names used to take
    # every label slot, and the real rotation that followed showed only as "other".
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    forger = make_root("Ops Forger Root", pki_set.now)
    unproven = _sample("attest_unpinned_issuer_total", issuer="unproven")
    for index in range(40):
        # No caIssuers URL on the cloud's allow-list: not how the cloud's signers look.
        url = "" if index % 2 else f"http://forger.example/ca-{index}.crt"
        with pytest.raises(UntrustedChain):
            holder.verify(_rotation_document(pki_set, leaf_key, f"Ops Forged CA {index}", url=url, root=forger,
                                             carry=True), policy=POLICY, now=pki_set.now)
    for index in range(3):
        # An organisation the cloud's CAs do not name.
        stranger = make_named_ca(digicert_name(f"Ops Other Org CA {index}"), forger, pki_set.now)
        leaf = make_leaf(stranger, leaf_key, pki_set.now, ca_issuers=["http://www.microsoft.com/pkiops/certs/x.crt"])
        with pytest.raises(UntrustedChain):
            holder.verify(sign_document(leaf, pki_set.now), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="unproven") == unproven + 43
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Forged CA 0") == 0
    with pytest.raises(UntrustedChain):
        holder.verify(_rotation_document(pki_set, leaf_key, "Ops Rotation CA 78", carry=True), policy=POLICY,
                      now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 78") == 1


def test_a_document_with_a_bad_signature_is_not_counted_as_unpinned(pinned: Path, pki_set: Pki, leaf_key) -> None:
    # The count comes after the signature and name checks (steps 4 and 5): a document whose signature does
    # not verify under its signer says nothing about Azure's CAs.
    ca = make_ca("Ops Rotation CA 79", pki_set.root, pki_set.now)
    leaf = make_leaf(ca, leaf_key, pki_set.now, ca_issuers=["http://www.microsoft.com/pkiops/certs/ca79.crt"])
    wrong_key = pki.CertifiedKey(certificate=leaf.certificate, private_key=pki.new_key("rsa"))
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    unproven = _sample("attest_unpinned_issuer_total", issuer="unproven")
    with pytest.raises(SignatureInvalid):
        holder.verify(sign_document(wrong_key, pki_set.now), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 79") == 0
    assert _sample("attest_unpinned_issuer_total", issuer="unproven") == unproven
    # The same document correctly signed is counted: the test above is not vacuous.
    with pytest.raises(UntrustedChain):
        holder.verify(sign_document(leaf, pki_set.now), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="unproven") == unproven + 1


@pytest.mark.parametrize("name", ["ops-issuing-ca-02.crt", "ops-issuing-ca-02.cer", "ops-issuing-ca-02.PEM"])
def test_a_pin_saved_under_another_extension_is_reported(pinned: Path, pki_set: Pki, leaf_key, run_cli,
                                                         caplog: pytest.LogCaptureFixture, name: str) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    successor = make_ca("Ops Test Issuing CA 02", pki_set.root, pki_set.now)
    (pinned / "public" / "intermediates" / name).write_bytes(pem(successor.certificate))
    (pinned / "public" / "intermediates" / ".editor-swap.tmp").write_bytes(b"hidden files are passed over")
    with caplog.at_level(logging.WARNING, logger="attest_service.trust.reload"):
        clock.now += 1
        holder.verifier()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"public/intermediates/{name}: not loaded" in line for line in warnings), warnings
    assert not any("editor-swap" in line for line in warnings)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert f"not_loaded: public: public/intermediates/{name}: not loaded" in out
    assert "editor-swap" not in out


def test_a_root_certifi_no_longer_carries_is_logged_on_reload(pinned: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    (pinned / "public" / "roots" / "certifi.txt").write_text("ab" * 32 + "  a root certifi dropped\n")
    with caplog.at_level(logging.WARNING, logger="attest_service.trust.reload"):
        clock.now += 1
        holder.verifier()
    assert not holder.failing  # the other roots still load: this narrows the trust, it does not break it
    assert any("ab" * 32 in r.getMessage() and "is not in certifi" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_requests_during_rotation_never_fail(pinned: Path, pki_set: Pki, leaf_key) -> None:
    # Real clock, short interval: verifying threads run while pins are added and removed underneath.
    holder = ReloadingVerifier(pinned, interval_seconds=0.01)
    document = sign_document(pki_set.leaf, pki_set.now)
    failures: list[BaseException] = []
    stop = threading.Event()
    counts = [0]

    def verify_loop() -> None:
        while not stop.is_set():
            try:
                holder.verify(document, policy=POLICY, now=pki_set.now)
                counts[0] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(exc)

    threads = [threading.Thread(target=verify_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    reloads = _sample("attest_trust_reload_total", result="success")
    try:
        for index in range(5):
            extra = make_ca(f"Ops Churn CA {index}", pki_set.root, pki_set.now)
            _add(pinned, extra.certificate)
            time.sleep(0.03)
            remove_pin(pinned, "public", fingerprint(extra.certificate))
            time.sleep(0.03)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not failures
    assert counts[0] > 0
    assert _sample("attest_trust_reload_total", result="success") > reloads


def test_a_removed_pin_copied_back_by_hand_stays_distrusted_until_certs_add(pinned: Path, pki_set: Pki, run_cli,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Loading used to consult removed.txt for the AIA fallback only: a removed CA whose file came back (by
    # hand, from a backup) was trusted again without anyone deciding so.
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    document = sign_document(pki_set.leaf, pki_set.now)
    holder.verify(document, policy=POLICY, now=pki_set.now)
    [path] = (pinned / "public" / "intermediates").glob("*.pem")
    backup = path.read_bytes()
    remove_pin(pinned, "public", fingerprint(pki_set.issuing.certificate))
    clock.now += 1
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    path.write_bytes(backup)
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="attest_service.trust.reload"):
        with pytest.raises(UntrustedChain):
            holder.verify(document, policy=POLICY, now=pki_set.now)
    assert not holder.failing  # the rest of the directory is in use; only that CA is left out
    assert any("Ops Test Issuing CA 01" in r.getMessage() and "is listed in public/intermediates/removed.txt and "
               "is not trusted" in r.getMessage() for r in caplog.records)
    assert _sample("attest_trust_problems") == 1
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert "removed_pinned: public: intermediate Ops Test Issuing CA 01" in out
    # Pinning it again is the operator's decision: certs add trusts the file that is there and unlists it.
    code, out, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(path))
    assert code == 0, err
    assert f"added: public: Ops Test Issuing CA 01 sha256 {fingerprint(pki_set.issuing.certificate)}" in out
    assert list((pinned / "public" / "intermediates").glob("*.pem")) == [path]
    assert not load_trust(pinned).for_cloud("public").removed
    clock.now += 1
    holder.verify(document, policy=POLICY, now=pki_set.now)
    assert _sample("attest_trust_problems") == 0
    assert run_cli("certs", "check", "--pinned-certs", str(pinned))[0] == 0


@pytest.mark.parametrize("listing", ["entry_beside_a_broken_line", "only_in_a_broken_line"])
def test_a_removal_applies_even_when_removed_txt_has_a_broken_line(pinned: Path, pki_set: Pki, run_cli, listing: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # A broken line used to fail the whole load, and the last good trust, with the CA in it, stayed in use.
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    document = sign_document(pki_set.leaf, pki_set.now)
    holder.verify(document, policy=POLICY, now=pki_set.now)
    digest = fingerprint(pki_set.issuing.certificate)
    removed = pinned / "public" / "intermediates" / "removed.txt"
    if listing == "entry_beside_a_broken_line":
        removed.write_text(f"# distrusted by hand\n{digest}  # Ops Test Issuing CA 01\nnot-a-fingerprint  # typo\n")
        broken = "public/intermediates/removed.txt:3: 'not-a-fingerprint' is not a SHA-256 or SHA-1 fingerprint"
    else:
        removed.write_text(f"# distrusted by hand\nsha256:{digest.upper()}  # Ops Test Issuing CA 01\n")
        broken = "public/intermediates/removed.txt:2: 'sha256:"
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="attest_service.trust.reload"):
        with pytest.raises(UntrustedChain):
            holder.verify(document, policy=POLICY, now=pki_set.now)
    assert not holder.failing
    assert any(broken in r.getMessage() for r in caplog.records)
    code, out, _ = run_cli("certs", "check", "--pinned-certs", str(pinned))
    assert code == 1
    assert f"removed_list: public: {broken}" in out
    assert "removed_pinned: public: intermediate Ops Test Issuing CA 01" in out
    if listing == "only_in_a_broken_line":
        # certs add could not take the CA off that line: it refuses until the line is fixed.
        [path] = (pinned / "public" / "intermediates").glob("*.pem")
        before = tree_digest(pinned)
        code, _, err = run_cli("certs", "add", "--cloud", "public", "--pinned-certs", str(pinned), str(path))
        assert code == 1
        assert "removed.txt:2 names this CA on a line that is not a fingerprint entry" in err
        assert tree_digest(pinned) == before


def test_a_removal_applies_to_the_last_good_trust_when_the_directory_does_not_load(
        pinned: Path, pki_set: Pki, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=1, clock=clock)
    document = sign_document(pki_set.leaf, pki_set.now)
    holder.verify(document, policy=POLICY, now=pki_set.now)
    intermediates = pinned / "public" / "intermediates"
    garbage = intermediates / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    (intermediates / "removed.txt").write_text(f"{fingerprint(pki_set.issuing.certificate)}  # Ops Test Issuing CA\n")
    clock.now += 1
    with caplog.at_level(logging.ERROR, logger="attest_service.trust.reload"):
        with pytest.raises(UntrustedChain):
            holder.verify(document, policy=POLICY, now=pki_set.now)
    assert holder.failing  # the rest of the last good trust stays in use, and the alert is up
    assert any("applied its removed.txt to the last good trust" in r.getMessage()
               and "Ops Test Issuing CA 01" in r.getMessage() for r in caplog.records)
    clock.now += 1
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)  # the same broken content: still applied
    garbage.unlink()
    clock.now += 1
    with pytest.raises(UntrustedChain):
        holder.verify(document, policy=POLICY, now=pki_set.now)
    assert not holder.failing
    # Once the directory loads, it alone decides: taking the line out trusts the CA again.
    (intermediates / "removed.txt").unlink()
    clock.now += 1
    holder.verify(document, policy=POLICY, now=pki_set.now)
