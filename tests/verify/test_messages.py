"""What a person reads when a document is refused: a sentence of ours, never a library's internals.

cryptography, asn1crypto and binascii explain their failures in their own terms (``cert is not valid at
validation time (encountered processing <Certificate(...)>)``, ``candidates exhausted``, ``number of data
characters (5) cannot be 1 more than a multiple of 4``); those stay on the exception as its ``__cause__``, for
the log at debug, and the refusal's message says what is wrong in words. Also here: which expiry a document
that is both expired and signed by an expired certificate is refused for.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest

from attest_service.errors import VerificationError
from attest_service.trust import bundled_pinned_dir, load_trust
from attest_service.verify import DocumentVerifier, TrustStore, VerificationPolicy, decode
from tests.support.azure_real import entry_params, expected_entries

from .conftest import case_input, case_instant, case_policy, load_index

CASES: Final = load_index()
#: Fragments of the libraries' own messages, and of Python's representations of their objects.
FOREIGN: Final = ("<Certificate", "encountered processing", "candidates exhausted", "validation failed",
                  "1 more than a multiple", "Errno", "urlopen", "asn1crypto", "Error:", "<class", "0x")


def _refusal(verifier: DocumentVerifier, data: bytes, policy: VerificationPolicy, at: Any) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        verifier.verify(decode(data), policy=policy, now=at)
    return caught.value


@pytest.fixture(scope="module")
def verifier(test_trust: TrustStore) -> DocumentVerifier:
    return DocumentVerifier(test_trust)


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case["expect"] != "ok"))
def test_every_refusal_is_a_sentence_of_ours(name: str, verifier: DocumentVerifier) -> None:
    case = CASES[name]
    error = _refusal(verifier, case_input(case), case_policy(case), case_instant(case))
    assert error.code == case["expect"]
    assert not [fragment for fragment in FOREIGN if fragment in error.message], error.message


NOT_BASE64: Final = ("signature: not strict base64 (the standard alphabet, padded with '=' to a multiple of 4 "
                      "characters, nothing else)")


@pytest.mark.parametrize(("signature", "expected"), [
    ("AAAAA", NOT_BASE64), ("AAAA*AAA", NOT_BASE64),
    ('{"encoding": "pkcs7", "signature": ', "document: not JSON (unreadable at character 34)"),
])
def test_undecodable_input_says_what_is_expected(verifier: DocumentVerifier, signature: str, expected: str) -> None:
    with pytest.raises(VerificationError) as caught:
        decode(signature)
    assert caught.value.message == expected
    # The library's account is kept for the log.
    assert caught.value.__cause__ is not None


def test_an_untrusted_chain_is_explained_without_the_librarys_words(verifier: DocumentVerifier) -> None:
    case = CASES["intermediate-not-pinned"]
    error = _refusal(verifier, case_input(case), case_policy(case), case_instant(case))
    assert error.message == "no path from the signer through pinned intermediates to a public root"
    assert "candidates exhausted" in str(error.__cause__)


def test_a_certificate_outside_its_validity_inside_the_documents_window(verifier: DocumentVerifier) -> None:
    case = CASES["leaf-expired"]
    error = _refusal(verifier, case_input(case), case_policy(case), case_instant(case))
    assert error.code == "certificate_expired"
    assert error.message.startswith("a path to a pinned root exists, but not at 2025-06-01T12:01:00+00:00: "
                                    "the signer is valid ")
    assert "(" not in error.message


def test_a_document_past_its_own_window_is_document_expired_though_its_certificate_expired_too(
        verifier: DocumentVerifier) -> None:
    # The same document a day later: its six-hour window has passed too. The document's expiry is reported,
    # the first thing that went wrong with it; the certificate's refusal is its cause.
    case = CASES["leaf-expired"]
    error = _refusal(verifier, case_input(case), case_policy(case), case_instant(case) + timedelta(days=1))
    assert error.code == "document_expired"
    assert error.message == "the document expired at 2025-06-01T18:00:00+00:00"
    assert type(error.__cause__).__name__ == "CertificateExpired"


def test_a_document_before_its_window_with_a_certificate_not_yet_valid_is_document_not_yet_valid(
        verifier: DocumentVerifier) -> None:
    case = CASES["leaf-not-yet-valid"]
    error = _refusal(verifier, case_input(case), case_policy(case), case_instant(case) - timedelta(days=1))
    assert error.code == "document_not_yet_valid"


@pytest.fixture(scope="module")
def bundled_verifier() -> DocumentVerifier:
    return DocumentVerifier(load_trust(bundled_pinned_dir()))


@pytest.mark.parametrize("entry", entry_params([entry for entry in expected_entries() if entry["verify_at"] < "2020"]))
def test_an_old_real_document_verified_long_after_is_document_expired(entry: dict[str, Any] | None,
                                                                        real_documents: Path,
                                                                        bundled_verifier: DocumentVerifier) -> None:
    assert entry is not None
    data = (real_documents / entry["document"]).read_bytes()
    at = datetime.fromisoformat(entry["verify_at"].replace("Z", "+00:00")) + timedelta(days=3650)
    error = _refusal(bundled_verifier, data, VerificationPolicy(), at)
    assert error.code == "document_expired"
    assert not [fragment for fragment in FOREIGN if fragment in error.message], error.message
