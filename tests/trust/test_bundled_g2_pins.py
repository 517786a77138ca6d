"""The bundle pins every issuing CA Azure signs documents under today, for the public and US Government clouds.

Since 2026 every region signs under one of the eight *Microsoft TLS G2 RSA CA OCSP* 02 to 16. With the AIA
fallback off (the default), a CA missing from the bundle refuses a whole region with ``untrusted_chain``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cryptography import x509

from attest_service.trust import MANIFEST, bundled_pinned_dir, load_trust, manifest_entry
from attest_service.trust.certificates import ca_path
from attest_service.verify import common_name

#: The current Azure issuing CAs, by the number in their name.
G2_ISSUING_CAS = tuple(f"Microsoft TLS G2 RSA CA OCSP {n:02d}" for n in range(2, 17, 2))
ROOT_G2 = "Microsoft TLS RSA Root G2"
#: Inside the validity of all eight (2025-08-01 to 2029-06-03).
DURING = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("cloud", ["public", "usgov"])
def test_every_g2_issuing_ca_is_pinned_and_chains_to_root_g2(cloud: str) -> None:
    trust = load_trust(bundled_pinned_dir()).for_cloud(cloud)
    pinned = {pin.subject_cn: pin for pin in trust.intermediates if pin.subject_cn in G2_ISSUING_CAS}
    assert sorted(pinned) == sorted(G2_ISSUING_CAS)
    root = next(pin.certificate for pin in trust.roots if pin.subject_cn == ROOT_G2)
    for name, pin in pinned.items():
        # Signed by the pinned Microsoft TLS RSA Root G2 itself, and a path the verifier accepts to a cloud root.
        pin.certificate.verify_directly_issued_by(root)
        path = ca_path(pin.certificate, trust, DURING)
        assert common_name(path[-1].subject) in {ROOT_G2, "DigiCert Global Root G2"}, name
        assert pin.certificate.not_valid_after_utc.date().isoformat() == "2029-06-03", name
        assert pin.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("cloud", ["public", "usgov"])
def test_every_g2_issuing_ca_has_its_provenance_in_the_manifest(cloud: str) -> None:
    directory = bundled_pinned_dir()
    entries = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["certificates"]
    recorded = {(e["cloud"], e["sha256"]): e for e in entries}
    for pin in load_trust(directory).for_cloud(cloud).intermediates:
        if pin.subject_cn in G2_ISSUING_CAS:
            entry = recorded[(cloud, pin.sha256)]
            assert {k: v for k, v in entry.items() if k not in ("source", "retired")} == {
                k: v for k, v in manifest_entry(pin, "").items() if k != "source"}
            assert "github.com" in entry["source"], entry
            assert "retired" not in entry
