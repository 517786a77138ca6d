"""The generated cases: each verifies to exactly its expected code, and the generator does not drift."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from attest_service import errors
from attest_service.trust import TrustStore
from attest_service.verify import DocumentVerifier, decode

from .conftest import ASSETS, TESTCASES, case_input, case_instant, case_policy, load_index

INDEX = load_index()


def _outcome(verifier: DocumentVerifier, case: dict[str, Any]) -> str:
    try:
        verifier.verify(decode(case_input(case)), policy=case_policy(case), now=case_instant(case))
    except errors.VerificationError as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize("name", sorted(INDEX))
def test_case(name: str, test_trust: TrustStore) -> None:
    case = INDEX[name]
    verifier = DocumentVerifier(test_trust)
    if case["expect"] != "ok":
        code = _outcome(verifier, case)
        assert code == case["expect"]
        return
    result = verifier.verify(decode(case_input(case)), policy=case_policy(case), now=case_instant(case))
    body = result.to_dict()
    assert body["verified"] is True
    assert body["cloud"] == case["cloud"]
    assert body["claims"] == case["claims"]
    assert result.signer.sha256 == case["signer_sha256"]
    assert json.loads(json.dumps(body)) == body


def test_one_verifier_gives_every_answer_in_any_order(test_trust: TrustStore) -> None:
    # A long-lived DocumentVerifier caches signers and chains; the cache must never change an answer, whatever
    # instants and clouds came before.
    verifier = DocumentVerifier(test_trust)
    names = sorted(INDEX)
    for order in (names, names[::-1], names):
        outcomes = {name: _outcome(verifier, INDEX[name]) for name in order}
        assert outcomes == {name: INDEX[name]["expect"] for name in order}


def test_every_verification_code_is_exercised() -> None:
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.VerificationError)
             and cls is not errors.VerificationError}
    assert codes <= {case["expect"] for case in INDEX.values()}


def test_attacks_are_never_accepted() -> None:
    attacks = {name: case["expect"] for name, case in INDEX.items() if name.startswith("attack-")}
    assert len(attacks) >= 4
    assert "ok" not in attacks.values()


@pytest.mark.slow
def test_generator_output_does_not_drift(tmp_path: Path) -> None:
    # Re-run the generator with the checked-in keys; every output must be byte-identical, so a change to
    # the generator or to the PKI helpers it uses shows up here rather than as silently stale fixtures.
    subprocess.run([sys.executable, str(ASSETS / "build_testcases.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(TESTCASES).as_posix() for p in TESTCASES.rglob("*") if p.is_file())
    assert built == checked_in
    _, mismatch, missing = filecmp.cmpfiles(tmp_path, TESTCASES, built, shallow=False)
    assert mismatch == []
    assert missing == []
