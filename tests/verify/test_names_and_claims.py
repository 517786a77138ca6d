"""Name and claim rules checked directly on the functions that apply them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from attest_service.clouds import CloudProfile
from attest_service.errors import MalformedDocument, SubjectMismatch
from attest_service.imds.pki import make_leaf, make_root, new_key
from attest_service.verify.claims import parse_claims, parse_timestamp
from attest_service.verify.names import cloud_for_signer, matching_name

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EC_KEY = new_key("ec")
ROOT = make_root(common_name="Names Test Root", key=EC_KEY, not_before=NOW - timedelta(days=1),
                 not_after=NOW + timedelta(days=30), serial=1)


def leaf(*dns_names: str, common_name: str = "metadata.azure.com") -> object:
    return make_leaf(dns_names=dns_names, common_name=common_name, key=EC_KEY, issuer=ROOT,
                     not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=30), serial=2).certificate


@pytest.mark.parametrize("name", ["*.metadata.azure.com", "a.*.metadata.azure.com", "-.metadata.azure.com",
                                  "eastus..metadata.azure.com", "east us.metadata.azure.com"])
def test_names_that_are_not_plain_hostnames_never_match(name: str) -> None:
    certificate = leaf(name)
    with pytest.raises(SubjectMismatch):
        matching_name(certificate, CloudProfile.public())  # type: ignore[arg-type]
    with pytest.raises(SubjectMismatch):
        cloud_for_signer(certificate)  # type: ignore[arg-type]


def test_a_plain_regional_name_matches() -> None:
    certificate = leaf("EastUS.Metadata.Azure.com")
    assert matching_name(certificate, CloudProfile.public()) == "EastUS.Metadata.Azure.com"  # type: ignore[arg-type]


def test_digits_of_other_scripts_are_not_a_timestamp() -> None:
    with pytest.raises(MalformedDocument):
        parse_timestamp("0\u0661/01/26 00:00:00 -0000", "createdOn")  # ARABIC-INDIC DIGIT ONE


@pytest.mark.parametrize("nonce", ["", "x" * 65])
def test_an_empty_or_overlong_signed_nonce_is_malformed(nonce: str) -> None:
    content = json.dumps({"nonce": nonce, "timeStamp": {"createdOn": "01/01/26 00:00:00 -0000",
                                                        "expiresOn": "01/01/26 06:00:00 -0000"}, "vmId": "v"}).encode()
    with pytest.raises(MalformedDocument, match="nonce"):
        parse_claims(content)



def _content_with(vm_id: str, *, extra: str = "") -> bytes:
    """Signed content with ``vm_id`` (and ``extra`` members) written as raw JSON text, escapes as given."""
    return ('{"nonce":"n-1","timeStamp":{"createdOn":"01/01/26 00:00:00 -0000","expiresOn":"01/01/26 06:00:00 -0000"},'
            f'"vmId":"{vm_id}"{extra}}}').encode()


@pytest.mark.parametrize(("vm_id", "extra"), [
    ("\\ud800", ""), ("vm-\\udfff", ""), ("v", ',"sku":"\\ude00\\ud83d"'), ("v", ',"\\udc00":"x"'),
], ids=["high", "low", "reversed-pair", "in-a-key"])
def test_an_unpaired_surrogate_escape_in_the_signed_content_is_malformed(vm_id: str, extra: str) -> None:
    # json decodes such an escape to a lone surrogate, which no UTF-8 encoding (the nonce store's digest of the
    # vmId) can take: refused as the malformed content it is, never a 500 after the signature verified.
    with pytest.raises(MalformedDocument, match="surrogate"):
        parse_claims(_content_with(vm_id, extra=extra))


def test_escaped_characters_and_a_paired_surrogate_escape_are_their_characters() -> None:
    claims = parse_claims(_content_with("\\ud83d\\ude00-\\u00e9-\\\\u0041"))
    assert claims.vm_id == "\U0001f600-\u00e9-\\u0041"
