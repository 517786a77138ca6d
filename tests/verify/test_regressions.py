"""Single-byte mutants that once escaped the core as foreign exceptions (found by the property tests).

Each is the generated valid document with one byte of its signer certificate or SignedData changed; the
core must refuse each with its own error, never let cryptography's or asn1crypto's exceptions through.
"""

from __future__ import annotations

import pytest

from attest_service.errors import VerificationError
from attest_service.trust import TrustStore
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode

from .conftest import case_input, case_instant, load_index

INDEX = load_index()


def _mutate(case: str, find: bytes, offset: int, value: int) -> bytes:
    der = decode(case_input(INDEX[case]))
    index = der.find(find)
    assert index >= 0
    position = index + offset
    return der[:position] + bytes((value,)) + der[position + 1:]


MUTANTS = {
    # AuthorityKeyIdentifier's OID turned into SubjectKeyIdentifier's: a duplicate extension.
    "duplicate-extension": ("ok-rsa", bytes.fromhex("0603551d23"), 4, 0x0E, "malformed_document"),
    # The subject CN's UTF8String tag turned into RELATIVE-OID in a leaf without SAN.
    "malformed-subject": ("ok-cn-only", b"\x0c\x12metadata.azure.com", 0, 0x0D, "malformed_document"),
    # The subject CN's value typed as a BIT STRING.
    "bit-string-name-value": ("ok-rsa", b"\x0c\x12metadata.azure.com", 0, 0x03, "malformed_document"),
    # The signer key's algorithm rsaEncryption turned into md2WithRSAEncryption.
    "unknown-key-algorithm": ("ok-rsa", bytes.fromhex("06092a864886f70d0101010500"), 10, 0x02,
                              "unsupported_document"),
    # digestAlgorithms' NULL parameters turned into an empty OCTET STRING.
    "digest-set-parameters": ("ok-rsa", bytes.fromhex("31 0f 30 0d 06 09 2a864886f70d01010b 0500"), 15, 0x04,
                              "malformed_document"),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_refused_with_our_error(name: str, test_trust: TrustStore) -> None:
    case, find, offset, value, expected = MUTANTS[name]
    mutant = _mutate(case, find, offset, value)
    with pytest.raises(VerificationError) as caught:
        DocumentVerifier(test_trust).verify(mutant, policy=VerificationPolicy(), now=case_instant(INDEX[case]))
    assert caught.value.code == expected
