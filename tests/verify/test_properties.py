"""Property tests of the parsers and the verifier (Hypothesis).

Arbitrary bytes and text, random DER trees and mutations of valid documents may only ever produce the
verification error family; a mutant is accepted only when it still means the same claims from the same
signer. The strict DER walker agrees with asn1crypto's CMS parser on every valid document, and on every
mutant it accepts.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from asn1crypto import cms, core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest_service.errors import VerificationError
from attest_service.trust import bundled_pinned_dir, load_trust
from attest_service.verify import DocumentVerifier, VerificationPolicy, decode
from attest_service.verify.pkcs7 import SignedData, parse_signed_data
from tests.support.azure_real import azure_real_dir

from .conftest import TESTCASES, case_input, case_instant, load_index

#: Examples per property; together the properties stay well under 30 seconds. Raise it through the
#: environment for a deeper run (``ATTEST_PROPERTY_EXAMPLES=20000``).
EXAMPLES = int(os.environ.get("ATTEST_PROPERTY_EXAMPLES", "300"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True, slots=True)
class Fixture:
    """A valid document, the verifier and instant it verifies with, and what it verifies to."""

    name: str
    der: bytes
    verifier: DocumentVerifier
    now: datetime
    claims: object
    signer: str


def _fixtures() -> list[Fixture]:
    test_verifier = DocumentVerifier(load_trust(TESTCASES / "pinned"))
    fixtures = []
    seen: set[bytes] = set()
    for name, case in sorted(load_index().items()):
        if case["expect"] != "ok" or case["policy"]["nonce"] is not None:
            continue
        der = decode(case_input(case))
        if der in seen:
            continue
        seen.add(der)
        fixtures.append(Fixture(name, der, test_verifier, case_instant(case), case["claims"], case["signer_sha256"]))
    expected = azure_real_dir() / "documents" / "expected.json"
    if expected.is_file():
        real_verifier = DocumentVerifier(load_trust(bundled_pinned_dir()))
        for entry in json.loads(expected.read_text(encoding="utf-8")):
            der = decode((expected.parent / entry["document"]).read_bytes())
            now = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00"))
            signer = real_verifier.verify(der, policy=VerificationPolicy(), now=now).signer.sha256
            fixtures.append(Fixture(entry["document"], der, real_verifier, now, entry["claims"], signer))
    return fixtures


FIXTURES = _fixtures()
TEST_VERIFIER = FIXTURES[0].verifier
NOW = FIXTURES[0].now


def _verify_any(data: bytes | str, verifier: DocumentVerifier = TEST_VERIFIER, now: datetime = NOW) -> None:
    """Decode and verify; only the verification error family may escape."""
    try:
        verifier.verify(decode(data), policy=VerificationPolicy(), now=now)
    except VerificationError:
        return


# --- arbitrary input ------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_verification_errors(data: bytes) -> None:
    _verify_any(data)
    try:
        TEST_VERIFIER.verify(data, policy=VerificationPolicy(), now=NOW)
    except VerificationError:
        pass
    else:
        pytest.fail("random bytes verified")


@PROPERTY_SETTINGS
@given(st.text(max_size=2048))
def test_random_text_raises_only_verification_errors(text: str) -> None:
    _verify_any(text)
    _verify_any(json.dumps({"encoding": "pkcs7", "signature": text}))


def _tlv(tag: int, body: bytes) -> bytes:
    if len(body) < 0x80:
        return bytes((tag, len(body))) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


_PRIMITIVE_TAGS = st.sampled_from([0x02, 0x04, 0x05, 0x06, 0x80, 0x81])
_CONSTRUCTED_TAGS = st.sampled_from([0x30, 0x31, 0xA0, 0xA1])
_OIDS = st.sampled_from([bytes.fromhex(h) for h in (
    "2a864886f70d010702", "2a864886f70d010701", "2a864886f70d01010b", "608648016503040201", "2a864886f70d010901")])

_der_trees = st.recursive(
    st.one_of(
        st.builds(_tlv, _PRIMITIVE_TAGS, st.binary(max_size=40)),
        st.builds(lambda body: _tlv(0x06, body), _OIDS),
        st.builds(lambda n: _tlv(0x02, n.to_bytes(1, "big")), st.integers(0, 5)),
    ),
    lambda children: st.builds(lambda tag, items: _tlv(tag, b"".join(items)), _CONSTRUCTED_TAGS,
                               st.lists(children, max_size=6)),
    max_leaves=40,
)


@PROPERTY_SETTINGS
@given(_der_trees)
def test_random_der_trees_raise_only_verification_errors(der: bytes) -> None:
    # Well-formed DER of plausible shape reaches deeper into the SignedData walk than random bytes do.
    wrapped = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d010702")) + _tlv(0xA0, der))
    for candidate in (der, wrapped):
        try:
            TEST_VERIFIER.verify(candidate, policy=VerificationPolicy(), now=NOW)
        except VerificationError:
            continue
        pytest.fail("a random DER tree verified")


# --- mutations of valid documents -----------------------------------------------------------------------


def _headers(der: bytes, offset: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """(start, header length, contents length) of every element of valid DER, depth first."""
    end = len(der) if end is None else end
    found = []
    while offset < end:
        first, length = der[offset], der[offset + 1]
        header = 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(der[offset + 2:offset + 2 + count], "big")
            header += count
        found.append((offset, header, length))
        if first & 0x20:
            found.extend(_headers(der, offset + header, offset + header + length))
        offset += header + length
    return found


def _encode_length(length: int, *, extra_octets: int = 0) -> bytes:
    if length < 0x80 and not extra_octets:
        return bytes((length,))
    size = length.to_bytes(max(1, (length.bit_length() + 7) // 8), "big")
    size = bytes(extra_octets) + size
    return bytes((0x80 | len(size),)) + size


@st.composite
def mutants(draw: st.DrawFn) -> tuple[Fixture, bytes]:
    fixture = draw(st.sampled_from(FIXTURES))
    der = fixture.der
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "non-minimal", "indefinite"]))
    if kind == "flip":
        index = draw(st.integers(0, len(der) - 1))
        mask = draw(st.integers(1, 255))
        return fixture, der[:index] + bytes((der[index] ^ mask,)) + der[index + 1:]
    if kind == "truncate":
        return fixture, der[:draw(st.integers(0, len(der) - 1))]
    if kind == "insert":
        index = draw(st.integers(0, len(der)))
        return fixture, der[:index] + draw(st.binary(min_size=1, max_size=8)) + der[index:]
    if kind == "delete":
        index = draw(st.integers(0, len(der) - 1))
        return fixture, der[:index] + der[index + draw(st.integers(1, 8)):]
    start, header, length = draw(st.sampled_from(_headers(der)))
    tag = der[start:start + 1]
    rest = der[start + header:]
    if kind == "length":
        new_length = max(0, length + draw(st.sampled_from([-2, -1, 1, 2, 128, -128])))
        return fixture, der[:start] + tag + _encode_length(new_length) + rest
    if kind == "non-minimal":
        return fixture, der[:start] + tag + _encode_length(length, extra_octets=draw(st.integers(0, 2))) + rest
    if not der[start] & 0x20:
        return fixture, der  # indefinite length exists only for constructed elements; keep the original
    contents = rest[:length]
    return fixture, der[:start] + tag + b"\x80" + contents + b"\x00\x00" + rest[length:]


@PROPERTY_SETTINGS
@given(mutants())
def test_mutants_are_refused_or_mean_the_same(mutant: tuple[Fixture, bytes]) -> None:
    fixture, der = mutant
    try:
        result = fixture.verifier.verify(der, policy=VerificationPolicy(), now=fixture.now)
    except VerificationError:
        return
    # Accepted: the mutation must not have changed what the document says or who said it.
    assert result.to_dict()["claims"] == fixture.claims
    assert result.signer.sha256 == fixture.signer
    # And what the strict walker accepted, asn1crypto reads the same way.
    _assert_same_as_asn1crypto(der, parse_signed_data(der))


@PROPERTY_SETTINGS
@given(mutants())
def test_mutants_through_base64_and_json_raise_only_verification_errors(mutant: tuple[Fixture, bytes]) -> None:
    fixture, der = mutant
    encoded = base64.b64encode(der).decode("ascii")
    _verify_any(json.dumps({"encoding": "pkcs7", "signature": encoded}), fixture.verifier, fixture.now)


# --- differential: the strict DER walker against asn1crypto ---------------------------------------------


def _assert_same_as_asn1crypto(der: bytes, ours: SignedData) -> None:
    info = cms.ContentInfo.load(der)
    assert info["content_type"].dotted == "1.2.840.113549.1.7.2"
    signed: Any = info["content"]
    encap = signed["encap_content_info"]
    assert ours.content_type == encap["content_type"].dotted
    assert ours.content == encap["content"].native
    assert ours.certificates == tuple(bytes(cert.dump()) for cert in signed["certificates"])
    assert [(a.oid, a.parameters) for a in ours.digest_algorithms] == [
        (alg["algorithm"].dotted, _parameters(alg)) for alg in signed["digest_algorithms"]]
    (signer_info,) = signed["signer_infos"]
    sid = signer_info["sid"]
    if sid.name == "issuer_and_serial_number":
        assert ours.signer.issuer_der == bytes(sid.chosen["issuer"].dump())
        assert ours.signer.serial == sid.chosen["serial_number"].native
    else:
        assert ours.signer.subject_key_identifier == sid.chosen.native
    assert (ours.digest_algorithm.oid, ours.digest_algorithm.parameters) == (
        signer_info["digest_algorithm"]["algorithm"].dotted, _parameters(signer_info["digest_algorithm"]))
    assert (ours.signature_algorithm.oid, ours.signature_algorithm.parameters) == (
        signer_info["signature_algorithm"]["algorithm"].dotted, _parameters(signer_info["signature_algorithm"]))
    assert ours.signature == signer_info["signature"].native
    attributes = signer_info["signed_attrs"]
    assert ours.signed_attributes == (None if isinstance(attributes, core.Void) else bytes(attributes.dump()))


def _parameters(algorithm: Any) -> bytes | None:
    parameters = algorithm["parameters"]
    return None if isinstance(parameters, core.Void) else bytes(parameters.dump())


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_der_walker_agrees_with_asn1crypto(fixture: Fixture) -> None:
    _assert_same_as_asn1crypto(fixture.der, parse_signed_data(fixture.der))


def test_der_walker_agrees_with_asn1crypto_on_every_generated_document() -> None:
    # Negative cases too, wherever the walker accepts the structure.
    compared = 0
    for case in load_index().values():
        try:
            der = decode(case_input(case))
            ours = parse_signed_data(der)
        except VerificationError:
            continue
        _assert_same_as_asn1crypto(der, ours)
        compared += 1
    assert compared >= 50
