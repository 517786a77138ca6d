"""``certs crls fetch`` against a real HTTP server on loopback, standing in for Microsoft's CRL hosts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from attest_service.errors import ConfigurationError
from attest_service.imds import pki
from attest_service.server import crl_refresh
from attest_service.settings import Settings
from attest_service.trust import crl_wanted, load_trust
from attest_service.trust.crl_fetch import CrlFetcher, CrlPolicy, crl_filename, wanted_crls
from attest_service.trust.crls import SOURCES_LIST
from attest_service.trust.issuers import AllowRule
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy
from tests.support import crls

from .conftest import BUNDLED, DAY, CaServer, Pki, make_ca, make_root, response_json, sign_document

PREFIX = "/pkiops/crl/"
#: The pinned directory, the root, the issuing CA, the leaf and a document it signed.
Published = tuple[Path, pki.CertifiedKey, pki.CertifiedKey, pki.CertifiedKey, bytes]


def _with_crl_url(certified: pki.CertifiedKey, issuer: pki.CertifiedKey | None, url: str) -> pki.CertifiedKey:
    """``certified``'s certificate again, with a cRLDistributionPoints naming ``url``, signed by ``issuer``."""
    return _with_crl_urls(certified, issuer, [url])


def _with_crl_urls(certified: pki.CertifiedKey, issuer: pki.CertifiedKey | None,
                   urls: list[str]) -> pki.CertifiedKey:
    """``certified``'s certificate again, with one distribution point naming ``urls``, signed by ``issuer``."""
    cert = certified.certificate
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier(url) for url in urls], None, None, None)]), critical=False)
    signer = issuer.private_key if issuer is not None else certified.private_key
    return pki.CertifiedKey(certificate=builder.sign(signer, hashes.SHA256()), private_key=certified.private_key)


@pytest.fixture
def published(tmp_path: Path, server: CaServer, leaf_key) -> Published:  # type: ignore[no-untyped-def]
    """A pinned directory whose issuing CA names the root's CRL URL, and a document whose signer names the CA's."""
    now = datetime.now(UTC)
    root = make_root("Fetch Test Root", now)
    issuing = _with_crl_url(make_ca("Fetch Test Issuing CA", root, now), root, server.url(PREFIX + "Fetch%20Root.crl"))
    leaf = pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                         common_name="metadata.azure.com", key=leaf_key, issuer=issuing, not_before=now - DAY,
                         not_after=now + 30 * DAY, serial=x509.random_serial_number())
    leaf = _with_crl_url(leaf, issuing, server.url(PREFIX + "Fetch%20Issuing%20CA.crl"))
    directory = tmp_path / "pins"
    pki.write_pinned_dir(directory, "public", root=root.certificate, intermediates=[issuing.certificate])
    return directory, root, issuing, leaf, sign_document(leaf, now)


def _fetcher(server: CaServer, **kwargs: object) -> CrlFetcher:
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
    options: dict[str, object] = {"allow_address": lambda address: address.is_loopback}
    options.update(kwargs)
    return CrlFetcher(CrlPolicy(allow={"public": (rule,)}), **options)  # type: ignore[arg-type]


def _serve(server: CaServer, path: str, data: bytes) -> None:
    server.routes[path] = (200, {"Content-Type": "application/pkix-crl"}, data)


def test_fetch_writes_verified_crls_atomically_and_refreshes_them(server: CaServer, published) -> None:  # type: ignore[no-untyped-def]
    directory, root, issuing, leaf, document = published
    now = datetime.now(UTC)
    _serve(server, PREFIX + "Fetch%20Root.crl", crls.der(crls.make_crl(root, now=now)))
    _serve(server, PREFIX + "Fetch%20Issuing%20CA.crl",
           crls.pem(crls.make_crl(issuing, revoked=[leaf.certificate.serial_number], now=now)))
    fetcher = _fetcher(server)
    trust = load_trust(directory)
    report = fetcher.fetch(directory, trust, wanted_crls(trust, directory, [document]))
    assert [o.result for o in report.outcomes] == ["written", "written"]
    assert report.missing == ()
    folder = directory / "public" / "crls"
    issuing_file = crl_filename(server.url(PREFIX + "Fetch%20Issuing%20CA.crl"))
    assert issuing_file.startswith("fetch-issuing-ca-")
    assert sorted(p.name for p in folder.iterdir()) == sorted([issuing_file, SOURCES_LIST,
                                                              crl_filename(server.url(PREFIX + "Fetch%20Root.crl"))])
    reloaded = load_trust(directory).for_cloud("public")
    assert len(reloaded.crls) == 2
    assert reloaded.crl_problems == ()
    # A refresh without the document still fetches the issuing CA's CRL: sources.txt remembers its URL.
    newer = crls.make_crl(issuing, revoked=[leaf.certificate.serial_number, 7], now=now, number=2)
    _serve(server, PREFIX + "Fetch%20Issuing%20CA.crl", crls.der(newer))
    trust = load_trust(directory)
    report = fetcher.fetch(directory, trust, wanted_crls(trust, directory))
    assert sorted(o.result for o in report.outcomes) == ["unchanged", "written"]
    assert (folder / issuing_file).read_bytes() == crls.der(newer)
    # No temporary file is left behind.
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_forged_crl_is_not_written(server: CaServer, published) -> None:  # type: ignore[no-untyped-def]
    directory, root, _, _, document = published
    now = datetime.now(UTC)
    _serve(server, PREFIX + "Fetch%20Root.crl", crls.der(crls.make_crl(root, now=now, key=pki.new_key("ec"))))
    _serve(server, PREFIX + "Fetch%20Issuing%20CA.crl", b"<html>not a CRL</html>")
    trust = load_trust(directory)
    report = _fetcher(server).fetch(directory, trust, wanted_crls(trust, directory, [document]))
    assert {o.result for o in report.outcomes} == {"invalid"}
    assert any("does not verify" in o.message for o in report.outcomes)
    assert len(report.missing) == 2
    assert not (directory / "public" / "crls").exists()


def test_an_older_crl_does_not_replace_a_newer_one(server: CaServer, published) -> None:  # type: ignore[no-untyped-def]
    directory, root, _, _, _ = published
    now = datetime.now(UTC)
    url = PREFIX + "Fetch%20Root.crl"
    fetcher = _fetcher(server)
    _serve(server, url, crls.der(crls.make_crl(root, now=now, number=5)))
    trust = load_trust(directory)
    assert [o.result for o in fetcher.fetch(directory, trust, wanted_crls(trust, directory)).outcomes] == ["written"]
    _serve(server, url, crls.der(crls.make_crl(root, now=now, number=4)))  # a stale mirror
    report = fetcher.fetch(directory, trust, wanted_crls(trust, directory))
    assert [o.result for o in report.outcomes] == ["older"]
    [crl] = load_trust(directory).for_cloud("public").crls
    assert crl.number == 5


@pytest.mark.parametrize(("setup", "result"), [
    ("not_allowed", "not_allowed"), ("loopback", "address_refused"), ("redirect", "redirect"),
    ("too_large", "too_large"), ("missing", "http_error")])
def test_fetch_guards(server: CaServer, published, setup: str, result: str) -> None:  # type: ignore[no-untyped-def]
    directory, root, _, _, _ = published
    url = PREFIX + "Fetch%20Root.crl"
    _serve(server, url, crls.der(crls.make_crl(root, now=datetime.now(UTC))))
    fetcher = _fetcher(server)
    if setup == "not_allowed":
        fetcher = CrlFetcher(CrlPolicy.azure(), allow_address=lambda address: address.is_loopback)
    elif setup == "loopback":
        rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=PREFIX)
        fetcher = CrlFetcher(CrlPolicy(allow={"public": (rule,)}))  # the default: public addresses only
    elif setup == "redirect":
        server.routes[url] = (302, {"Location": "http://169.254.169.254/"}, b"")
    elif setup == "too_large":
        fetcher = _fetcher(server, max_bytes=100)
    else:
        del server.routes[url]
    trust = load_trust(directory)
    report = fetcher.fetch(directory, trust, wanted_crls(trust, directory))
    assert [o.result for o in report.outcomes] == [result]
    assert server.hits[url] == (0 if setup in ("not_allowed", "loopback") else 1)
    assert not (directory / "public" / "crls").exists()


def test_command_fetches_only_from_the_allow_listed_hosts(run_cli, published, tmp_path: Path, server: CaServer) -> None:  # type: ignore[no-untyped-def]
    directory, _, _, _, document = published
    path = tmp_path / "document.json"
    path.write_bytes(response_json(document))
    code, out, _ = run_cli("certs", "crls", "fetch", "--json", "--pinned-certs", str(directory),
                           "--document", str(path))
    assert code == 1
    report = json.loads(out)
    assert {o["result"] for o in report["outcomes"]} == {"not_allowed"}
    assert len(report["missing"]) == 2
    assert sum(server.hits.values()) == 0
    code, out, _ = run_cli("certs", "crls", "list", "--json", "--pinned-certs", str(directory))
    assert code == 0
    assert json.loads(out) == {"crls": [], "notUsed": []}
    code, _, err = run_cli("certs", "crls", "fetch", "--pinned-certs", str(directory), "--every", "1")
    assert code == 2
    assert "--every" in err


def test_bundled_pins_name_only_allow_listed_crl_hosts(pki_set: Pki) -> None:
    trust = load_trust(BUNDLED)
    policy = CrlPolicy.azure()
    wanted = wanted_crls(trust, BUNDLED)
    assert wanted
    for item in wanted:
        assert any(policy.allowed(item.cloud, url) for url in item.urls), item


def test_refresh_setting_is_validated() -> None:
    assert Settings.from_env({}).crl_refresh_seconds == 0
    assert Settings.from_env({"ATTEST_CRL_REFRESH_SECONDS": "3600"}).crl_refresh_seconds == 3600
    for bad in ("30", "-1", "soon"):
        with pytest.raises(ConfigurationError, match="ATTEST_CRL_REFRESH_SECONDS"):
            Settings.from_env({"ATTEST_CRL_REFRESH_SECONDS": bad})


@pytest.mark.slow
def test_refresher_runs_the_fetch_beside_the_service_and_stops_with_it(pinned: Path, tmp_path: Path) -> None:
    settings = Settings.from_env({"ATTEST_PINNED_CERTS": str(pinned), "ATTEST_CRL_REFRESH_SECONDS": "60"})
    log = tmp_path / "refresh.log"
    with log.open("wb") as output:
        crl_refresh.start(settings, output=output)
        try:
            deadline = time.monotonic() + 30
            while b"next round in 60 s" not in log.read_bytes():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            crl_refresh.stop()
    # The fixture's CAs name no CRL: the first round fetched nothing, and the process waited for the next one.
    assert b"Traceback" not in log.read_bytes()
    off = Settings.from_env({"ATTEST_PINNED_CERTS": str(pinned)})
    crl_refresh.start(off)
    assert crl_refresh._process is None  # nothing started when the setting is off


@pytest.mark.slow
def test_refresher_stops_when_its_parent_is_gone(pinned: Path, tmp_path: Path) -> None:
    """Killed without its on_exit hook, the master leaves an orphan: it notices and stops."""
    settings = Settings.from_env({"ATTEST_PINNED_CERTS": str(pinned), "ATTEST_CRL_REFRESH_SECONDS": "60"})
    log = tmp_path / "refresh.log"
    # A parent that starts the refresher in the background and exits at once.
    argv = [shlex.quote(word) for word in crl_refresh.command(settings)]
    argv[argv.index("--parent-pid") + 1] = "$$"  # the launching shell, which exits at once
    background = f'{" ".join(argv)} > "{log}" 2>&1 & echo $!'
    launcher = subprocess.run(["/bin/sh", "-c", background], capture_output=True, text=True, check=True, timeout=30)
    pid = int(launcher.stdout.strip())
    try:
        deadline = time.monotonic() + 30
        while b"has exited: stopping" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes():
            assert time.monotonic() < deadline, "the orphaned refresher still runs"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # only when the test failed: the process is gone otherwise


def test_command_refuses_unusable_documents_as_usage_errors(run_cli, pinned: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for number, data in enumerate((b"not base64!", b'{"encoding": "pkcs7", "signature": "AAAA"}', b"\x30\x03\x02\x01")):
        path = tmp_path / f"document-{number}.json"
        path.write_bytes(data)
        code, out, err = run_cli("certs", "crls", "fetch", "--pinned-certs", str(pinned), "--document", str(path))
        assert code in (1, 2), (data, out, err)
        assert "Traceback" not in out + err


# --- the CRL URLs of signers the service verified without a current CRL ------------------------------------


@pytest.fixture
def noting(pinned: Path) -> Iterator[Path]:
    crl_wanted.enable(pinned)
    try:
        yield pinned
    finally:
        crl_wanted.enable(None)


def test_service_notes_the_crl_urls_of_signers_no_current_crl_covers(noting: Path, pki_set: Pki, leaf_key) -> None:  # type: ignore[no-untyped-def]
    partition = ["http://www.microsoft.com/pkiops/crl/partition/Test_Partition00045.crl",
                 "http://crl2.microsoft.com/pkiops/crl/partition/Test_Partition00045.crl"]
    leaf = _with_crl_urls(pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                                        common_name="metadata.azure.com", key=leaf_key, issuer=pki_set.issuing,
                                        not_before=pki_set.now - DAY, not_after=pki_set.now + 30 * DAY,
                                        serial=x509.random_serial_number()), pki_set.issuing, partition)
    document = sign_document(leaf, pki_set.now)
    for _ in range(2):  # two workers of one pod
        verifier = ReloadingVerifier(noting, interval_seconds=5)
        for _ in range(3):
            verifier.verify(document, policy=VerificationPolicy(), now=pki_set.now)
        crl_wanted.enable(noting)  # a new worker remembers nothing: the file dedupes
    wanted_file = noting / "public" / "crls" / "wanted.txt"
    [line] = wanted_file.read_text().splitlines()
    assert line.startswith(" ".join(partition) + "  # CRL of CN=Ops Test Issuing CA 01")
    # The next fetch round wants it (both URLs as alternatives for one CRL); the loader passes over the file.
    trust = load_trust(noting)
    wanted = [item for item in wanted_crls(trust, noting) if "wanted.txt" in item.reason]
    assert [(item.cloud, item.urls) for item in wanted] == [("public", tuple(partition))]
    assert trust.for_cloud("public").crl_problems == ()


def test_nothing_is_noted_when_off_or_when_a_current_crl_covers_the_path(pinned: Path, pki_set: Pki,
                                                                         leaf_key) -> None:  # type: ignore[no-untyped-def]
    url = "http://www.microsoft.com/pkiops/crl/Ops%20Test%20Issuing%20CA%2001.crl"
    leaf = _with_crl_url(pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                                       common_name="metadata.azure.com", key=leaf_key, issuer=pki_set.issuing,
                                       not_before=pki_set.now - DAY, not_after=pki_set.now + 30 * DAY,
                                       serial=x509.random_serial_number()), pki_set.issuing, url)
    document = sign_document(leaf, pki_set.now)
    ReloadingVerifier(pinned, interval_seconds=5).verify(document, policy=VerificationPolicy(), now=pki_set.now)
    assert not (pinned / "public" / "crls").exists()  # not enabled: the service writes nothing
    folder = pinned / "public" / "crls"
    folder.mkdir()
    (folder / "issuing.crl").write_bytes(crls.der(crls.make_crl(pki_set.issuing, now=pki_set.now)))
    (folder / "root.crl").write_bytes(crls.der(crls.make_crl(pki_set.root, now=pki_set.now)))
    crl_wanted.enable(pinned)
    try:
        result = ReloadingVerifier(pinned, interval_seconds=5).verify(document, policy=VerificationPolicy(),
                                                                      now=pki_set.now)
    finally:
        crl_wanted.enable(None)
    assert result.revocation_unknown == 0
    assert not (folder / "wanted.txt").exists()


def test_the_wanted_list_never_grows_past_what_is_read_back(noting: Path, pki_set: Pki, leaf_key,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    folder = noting / "public" / "crls"
    folder.mkdir()
    wanted_file = folder / "wanted.txt"
    filler = "http://www.microsoft.com/pkiops/crl/partition/Filler{:06d}.crl  # CRL of CN=Filler\n"
    lines = [filler.format(number) for number in range(crl_wanted.MAX_WANTED_BYTES // len(filler))]
    wanted_file.write_text("".join(lines))
    assert crl_wanted.MAX_WANTED_BYTES - 200 < wanted_file.stat().st_size <= crl_wanted.MAX_WANTED_BYTES
    documents = []
    for number in range(2):  # two signers, each new to the list
        url = f"http://www.microsoft.com/pkiops/crl/partition/Test_Partition{number:05d}.crl"
        leaf = _with_crl_url(pki.make_leaf(dns_names=["eastus.metadata.azure.com", "metadata.azure.com"],
                                           common_name="metadata.azure.com", key=leaf_key, issuer=pki_set.issuing,
                                           not_before=pki_set.now - DAY, not_after=pki_set.now + 30 * DAY,
                                           serial=x509.random_serial_number()), pki_set.issuing, url)
        documents.append(sign_document(leaf, pki_set.now))
    verifier = ReloadingVerifier(noting, interval_seconds=5)
    with caplog.at_level("WARNING", logger="attest_service.trust.crl_wanted"):
        for document in documents:
            assert verifier.verify(document, policy=VerificationPolicy(), now=pki_set.now).revocation_unknown
    # Nothing appended past the cap: the list still reads back whole, so it still dedupes and is fetched from.
    assert wanted_file.read_text() == "".join(lines)
    assert len(crl_wanted.read_wanted(folder)) == len(lines)
    full = [record for record in caplog.records if "is full" in record.getMessage()]
    assert len(full) == 1, caplog.text  # once per process, not once per signer


def test_a_link_or_a_fifo_under_the_wanted_list_name_is_never_written_through(noting: Path, pki_set: Pki, leaf_key,
                                                                             tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The service appends to the list it finds: a symbolic link there must not make it append to whatever file
    # the link names (the nonce database, a key), and a FIFO must not hold the verification.
    folder = noting / "public" / "crls"
    folder.mkdir()
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the service's to append to\n")
    (folder / "wanted.txt").symlink_to(outside)
    verifier = ReloadingVerifier(noting, interval_seconds=5)
    for number, setup in enumerate((None, "fifo")):
        if setup == "fifo":
            (folder / "wanted.txt").unlink()
            os.mkfifo(folder / "wanted.txt")
        url = f"http://www.microsoft.com/pkiops/crl/partition/Link_Partition{number:05d}.crl"
        leaf = _with_crl_url(pki.make_leaf(dns_names=["metadata.azure.com"], common_name="metadata.azure.com",
                                           key=leaf_key, issuer=pki_set.issuing, not_before=pki_set.now - DAY,
                                           not_after=pki_set.now + 30 * DAY, serial=x509.random_serial_number()),
                             pki_set.issuing, url)
        assert verifier.verify(sign_document(leaf, pki_set.now), policy=VerificationPolicy(),
                               now=pki_set.now).revocation_unknown
    assert outside.read_text() == "not the service's to append to\n"


@pytest.mark.slow  # waits out the lock
def test_a_lock_held_on_the_wanted_list_does_not_hold_a_verification(noting: Path, pki_set: Pki, leaf_key) -> None:  # type: ignore[no-untyped-def]
    # The list is world-readable, and a read-only descriptor can take flock's exclusive lock: whoever holds it
    # must not stall every worker that notes a signer. The note is skipped; the verification goes on.
    folder = noting / "public" / "crls"
    folder.mkdir()
    wanted_file = folder / "wanted.txt"
    wanted_file.write_text("")
    leaf = _with_crl_url(pki.make_leaf(dns_names=["metadata.azure.com"], common_name="metadata.azure.com",
                                       key=leaf_key, issuer=pki_set.issuing, not_before=pki_set.now - DAY,
                                       not_after=pki_set.now + 30 * DAY, serial=x509.random_serial_number()),
                         pki_set.issuing, "http://www.microsoft.com/pkiops/crl/partition/Held_Partition00001.crl")
    document = sign_document(leaf, pki_set.now)
    verifier = ReloadingVerifier(noting, interval_seconds=5)
    done = threading.Event()

    def verify() -> None:
        assert verifier.verify(document, policy=VerificationPolicy(), now=pki_set.now).revocation_unknown
        done.set()

    holder = os.open(wanted_file, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        thread = threading.Thread(target=verify, daemon=True)
        thread.start()
        assert done.wait(timeout=5), "the verification waited on another process's lock of the wanted list"
    finally:
        os.close(holder)  # releases the lock (and a stalled verification, on the old code)
    thread.join(timeout=10)
    assert wanted_file.read_text() == ""
