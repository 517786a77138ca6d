"""What forged documents can do to the operator's signals: write log lines, take metric labels, page.

Anyone can sign a document with a certificate of their own making whose name is the cloud's metadata
domain, whose issuer claims ``O=Microsoft Corporation`` and whose caIssuers URL is on the allow-list. Such a
document passes the signature and name checks (steps 4 and 5) and is refused at the chain (step 6) as
``untrusted_chain``: exactly where a genuine document under a new, unpinned Azure CA is refused. So:

- every string of the document reaches the log escaped (one record is one line, whatever the URL holds);
- an issuer is named in ``attest_unpinned_issuer_total{issuer}`` only when it is proven: its certificate
  (carried in the document, or fetched by the AIA fallback) chains to a pinned root of the cloud and signed
  the signer's certificate. Everything else counts under ``issuer="unproven"``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY

from attest_service.errors import UntrustedChain
from attest_service.imds import pki
from attest_service.logsafe import loggable
from attest_service.trust.aia import AiaFetcher, AiaPolicy, AllowRule
from attest_service.trust.metrics import UNPINNED_LOG_SECONDS, UNPROVEN_ISSUER, UNPROVEN_LOG_SECONDS
from attest_service.trust.reload import ReloadingVerifier
from attest_service.verify import VerificationPolicy

from .conftest import CaServer, Pki, make_ca, make_leaf, make_root

POLICY = VerificationPolicy()
MICROSOFT = "http://www.microsoft.com/pkiops/certs/"
#: What the review sent: 34 forged documents took 31 labels and fired the critical alert.
FORGED_DOCUMENTS = 34
FORGED_LINE = "2026-12-05 10:00:00,000 CRITICAL attest_service.web: all pins removed, verification disabled"


class FakeClock:
    """A monotonic clock moved by hand, so that log intervals pass without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _issuer_labels() -> set[str]:
    return {sample.labels["issuer"] for metric in REGISTRY.collect() if metric.name == "attest_unpinned_issuer"
            for sample in metric.samples if sample.name == "attest_unpinned_issuer_total"}


def _document(leaf: pki.CertifiedKey, pki_set: Pki, *carried: pki.CertifiedKey) -> bytes:
    content = pki.attested_content(nonce="forged", vm_id="00000000-0000-0000-0000-000000000001",
                                   subscription_id="00000000-0000-0000-0000-000000000002", sku="sku",
                                   plan=("", "", ""), license_type="", created_on=pki_set.now,
                                   expires_on=pki_set.now)
    return pki.sign_attested(content, signer=leaf, extra_certificates=[c.certificate for c in carried])


@pytest.fixture
def service_log() -> Iterator[io.StringIO]:
    """The trust log as a file would hold it: the service's format, one record after the other."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("attest_service.trust")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- the log ---------------------------------------------------------------------------------------------------


def test_loggable_escapes_every_line_break_and_control_character() -> None:
    assert loggable("http://www.microsoft.com/pkiops/certs/a.crt") == "http://www.microsoft.com/pkiops/certs/a.crt"
    assert loggable("a\nb\r\nc\td") == "a\\nb\\r\\nc\\td"
    assert loggable("\x1b[2J\x00\x7f\x85") == "\\x1b[2J\\x00\\x7f\\x85"
    assert loggable("line\u2028separator\u2029\ufeff") == "line\\u2028separator\\u2029\\ufeff"
    # The backslash is escaped too, so that an escape in the output is always the service's own.
    assert loggable("C:\\n") == "C:\\\\n"
    assert loggable("Ops CA \U000e0041") == "Ops CA \\U000e0041"
    assert loggable("é ü 中") == "é ü 中"
    assert loggable("x" * 300) == "x" * 200 + "..."
    assert loggable("\n" * 300, limit=3) == "\\n\\n\\n..."
    for text in ("a\nb", "\x85", "\u2028", "\x1c\x1d\x1e", "\x0b\x0c"):
        assert len(loggable(text).splitlines()) == 1


def test_a_newline_in_a_caissuers_url_stays_in_one_log_line(pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey,
                                                           service_log: io.StringIO) -> None:
    forger = make_root("Ops Forger Root", pki_set.now)
    forged_ca = make_ca("Ops Forged Issuing CA 01", forger, pki_set.now)
    url = f"{MICROSOFT}ca.crt\n{FORGED_LINE}"
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    with pytest.raises(UntrustedChain):
        holder.verify(_document(make_leaf(forged_ca, leaf_key, pki_set.now, ca_issuers=[url]), pki_set),
                      policy=POLICY, now=pki_set.now)
    lines = service_log.getvalue().splitlines()
    assert [line for line in lines if "CRITICAL" in line.split(": ", 1)[0]] == []
    [line] = [line for line in lines if "unpinned issuing CA" in line]
    assert "ca.crt\\n2026-12-05 10:00:00,000 CRITICAL" in line


def test_a_newline_in_an_issuer_name_stays_in_one_log_line(pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey,
                                                          service_log: io.StringIO) -> None:
    forger = make_root("Ops Forger Root", pki_set.now)
    # A common name holds at most 64 characters: the start of a forged line fits.
    forged_ca = make_ca(f"Ops Forged CA\r\n{FORGED_LINE[:40]}", forger, pki_set.now)
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    with pytest.raises(UntrustedChain):
        holder.verify(_document(make_leaf(forged_ca, leaf_key, pki_set.now, ca_issuers=[f"{MICROSOFT}b.crt"]),
                                pki_set), policy=POLICY, now=pki_set.now)
    lines = service_log.getvalue().splitlines()
    [line] = [line for line in lines if "unpinned issuing CA" in line]
    assert "Ops Forged CA\\r\\n2026-12-05" in line
    assert not any(line.startswith("2026-12-05 10:00:00,000 CRITICAL") for line in lines)


def test_the_aia_fetch_log_escapes_the_url(server: CaServer, pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey,
                                           service_log: io.StringIO) -> None:
    forger = make_root("Ops Forger Root", pki_set.now)
    forged_ca = make_ca("Ops Forged Issuing CA 02", forger, pki_set.now)
    prefix = "/pkiops/certs/"
    url = server.publish(f"{prefix}forged.crt", forged_ca.certificate.public_bytes(serialization.Encoding.DER))
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=prefix)
    aia = AiaFetcher(AiaPolicy(allow={"public": (rule,)}), allow_address=lambda address: address.is_loopback)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=aia, clock=FakeClock())
    for target in (url, f"{url}\n{FORGED_LINE}"):
        with pytest.raises(UntrustedChain):
            holder.verify(_document(make_leaf(forged_ca, leaf_key, pki_set.now, ca_issuers=[target]), pki_set),
                          policy=POLICY, now=pki_set.now)
    lines = service_log.getvalue().splitlines()
    aia_lines = [line for line in lines if "AIA:" in line]
    assert len(aia_lines) == 2, lines
    # A URL holding a control character is on no allow-list (urlsplit would drop the newline and match it).
    assert "AIA: not_allowed" in aia_lines[1]
    assert "forged.crt\\n2026-12-05 10:00:00,000 CRITICAL" in aia_lines[1]
    assert server.hits[f"{prefix}forged.crt"] == 1
    assert not any(line.startswith("2026-12-05 10:00:00,000") for line in lines)


# --- the metric ------------------------------------------------------------------------------------------------


def test_forged_documents_take_no_issuer_label(pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey) -> None:
    # The review's forgery: each document's issuer names O=Microsoft Corporation and an allow-listed URL,
    # and carries its forged CA, which does not chain to a pinned root.
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    forger = make_root("Microsoft RSA Root Certificate Authority 2017", pki_set.now)
    labels = _issuer_labels()
    unproven = _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER)
    for index in range(FORGED_DOCUMENTS):
        forged_ca = make_ca(f"Microsoft Azure RSA TLS Issuing CA {index:02d}", forger, pki_set.now)
        leaf = make_leaf(forged_ca, leaf_key, pki_set.now, ca_issuers=[f"{MICROSOFT}forged-{index}.crt"])
        with pytest.raises(UntrustedChain):
            holder.verify(_document(leaf, pki_set, forged_ca, forger), policy=POLICY, now=pki_set.now)
    assert _issuer_labels() - labels <= {UNPROVEN_ISSUER}
    assert _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER) == unproven + FORGED_DOCUMENTS


def test_a_carried_ca_under_a_pinned_root_that_did_not_sign_the_signer_proves_nothing(
        pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey) -> None:
    # The real new CA (under the pinned root) carried beside a signer that a forged CA of the same name signed.
    genuine = make_ca("Ops Rotation CA 91", pki_set.root, pki_set.now)
    forger = make_root("Ops Forger Root", pki_set.now)
    impostor = make_ca("Ops Rotation CA 91", forger, pki_set.now)
    assert impostor.certificate.subject == genuine.certificate.subject
    leaf = make_leaf(impostor, leaf_key, pki_set.now, ca_issuers=[f"{MICROSOFT}ca91.crt"])
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    unproven = _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER)
    with pytest.raises(UntrustedChain):
        holder.verify(_document(leaf, pki_set, genuine), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 91") == 0
    assert _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER) == unproven + 1


def test_a_carried_ca_that_chains_to_a_pinned_root_and_signed_the_signer_is_named(
        pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey) -> None:
    genuine = make_ca("Ops Rotation CA 92", pki_set.root, pki_set.now)
    leaf = make_leaf(genuine, leaf_key, pki_set.now, ca_issuers=[f"{MICROSOFT}ca92.crt"])
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=FakeClock())
    unproven = _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER)
    for _ in range(2):
        with pytest.raises(UntrustedChain):
            holder.verify(_document(leaf, pki_set, genuine), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 92") == 2
    assert _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER) == unproven
    # Without the CA the same document proves nothing: the label above came from the proof.
    with pytest.raises(UntrustedChain):
        holder.verify(_document(leaf, pki_set), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 92") == 2
    assert _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER) == unproven + 1


def test_a_ca_the_aia_fallback_fetched_and_accepted_is_named(server: CaServer, pinned: Path, pki_set: Pki,
                                                             leaf_key: rsa.RSAPrivateKey) -> None:
    prefix = "/pkiops/certs/"
    genuine = make_ca("Ops Rotation CA 93", pki_set.root, pki_set.now)
    forger = make_root("Ops Forger Root", pki_set.now)
    forged = make_ca("Ops Rotation CA 94", forger, pki_set.now)
    rule = AllowRule(scheme="http", host="127.0.0.1", port=server.port, path_prefix=prefix)
    aia = AiaFetcher(AiaPolicy(allow={"public": (rule,)}), allow_address=lambda address: address.is_loopback)
    holder = ReloadingVerifier(pinned, interval_seconds=10, aia=aia, clock=FakeClock())
    unproven = _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER)
    for ca, name in ((genuine, "ca93.crt"), (forged, "ca94.crt")):
        server.publish(prefix + name, ca.certificate.public_bytes(serialization.Encoding.DER))
    holder.verify(_document(make_leaf(genuine, leaf_key, pki_set.now, ca_issuers=[server.url(prefix + "ca93.crt")]),
                            pki_set), policy=POLICY, now=pki_set.now)
    with pytest.raises(UntrustedChain):
        holder.verify(_document(make_leaf(forged, leaf_key, pki_set.now, ca_issuers=[server.url(prefix + "ca94.crt")]),
                                pki_set), policy=POLICY, now=pki_set.now)
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 93") == 1
    assert _sample("attest_unpinned_issuer_total", issuer="Ops Rotation CA 94") == 0
    assert _sample("attest_unpinned_issuer_total", issuer=UNPROVEN_ISSUER) == unproven + 1


def test_unproven_issuers_are_logged_once_per_name_and_interval_with_a_floor_between_lines(
        pinned: Path, pki_set: Pki, leaf_key: rsa.RSAPrivateKey, service_log: io.StringIO) -> None:
    clock = FakeClock()
    holder = ReloadingVerifier(pinned, interval_seconds=10, clock=clock)
    forger = make_root("Ops Forger Root", pki_set.now)

    def send(name: str) -> None:
        leaf = make_leaf(make_ca(name, forger, pki_set.now), leaf_key, pki_set.now, ca_issuers=[f"{MICROSOFT}x.crt"])
        with pytest.raises(UntrustedChain):
            holder.verify(_document(leaf, pki_set), policy=POLICY, now=pki_set.now)

    def logged() -> list[str]:
        return [line for line in service_log.getvalue().splitlines() if "unpinned issuing CA" in line]

    for index in range(FORGED_DOCUMENTS):
        send(f"Ops Forged CA {index}")
    assert len(logged()) == 1
    clock.now += UNPROVEN_LOG_SECONDS
    send("Ops Forged CA 0")  # this name's interval has not passed
    assert len(logged()) == 1
    send("Ops Rotation CA 95")
    assert len(logged()) == 2
    assert "CN=Ops Rotation CA 95" in logged()[1]
    clock.now += UNPINNED_LOG_SECONDS
    send("Ops Forged CA 0")
    assert len(logged()) == 3


@pytest.mark.parametrize("suffix", ["\n2026-12-05 forged", "\r", "\t", "\x1b[2J", " x", "\u2028"])
def test_a_caissuers_url_with_a_control_character_or_space_is_on_no_allow_list(suffix: str) -> None:
    # urlsplit drops tabs and newlines, so such a URL would otherwise match a rule and reach the fetchers' logs.
    policy = AiaPolicy.azure()
    assert policy.allowed("public", f"{MICROSOFT}ca.crt")
    assert not policy.allowed("public", f"{MICROSOFT}ca.crt{suffix}")
