"""The fuzz target's seeds and regressions, and a bounded coverage-guided run.

Every file under ``regressions/`` is an input that once made the document path raise something other
than a VerificationError; each must now be refused with a code. The bounded run (FUZZ_CI_SECONDS, default
20) fuzzes the document path with atheris from the same seeds; ``make fuzz`` runs it longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import tools
from tests.system.fuzz.target import OPEN_CRASHES, REGRESSIONS_DIR, REPO_ROOT, Crash, check_one, seed_inputs

#: Length of the bounded fuzzing session inside the test suite, in seconds.
CI_FUZZ_SECONDS = int(os.environ.get("FUZZ_CI_SECONDS", "20"))
#: Margin on top of the fuzzing time for start-up, seeding and shutdown, in seconds.
CI_FUZZ_MARGIN_SECONDS = 60

REGRESSIONS = sorted(REGRESSIONS_DIR.glob("*.bin"))
SEEDS = list(seed_inputs())


def _regression_param(path: Path) -> object:
    marks = []
    if path.stem in OPEN_CRASHES:
        marks.append(pytest.mark.xfail(strict=True, raises=Crash,
                                       reason=f"open: {OPEN_CRASHES[path.stem]}"))
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", [_regression_param(path) for path in REGRESSIONS])
def test_regression_is_refused_with_a_code(path: Path) -> None:
    try:
        outcome = check_one(path.read_bytes())
    except Crash as exc:
        # Name the signature, so a changed failure site shows instead of passing as the known one.
        if OPEN_CRASHES.get(path.stem) == exc.signature:
            raise
        pytest.fail(f"{path.name}: {exc.signature}: {exc}")
    assert outcome != "verified"


def test_regression_stems_are_listed_only_when_present() -> None:
    present = {path.stem for path in REGRESSIONS}
    assert set(OPEN_CRASHES) <= present


@pytest.mark.parametrize(("name", "data"), SEEDS, ids=[name for name, _ in SEEDS])
def test_seed_does_not_crash(name: str, data: bytes) -> None:
    check_one(data)


def test_generated_seeds_reach_the_end_of_the_document_path() -> None:
    # Seeds that verify are what lets mutations reach the claims, time and nonce steps.
    outcomes = {name: check_one(data) for name, data in SEEDS if name.startswith("fuzz-")}
    assert outcomes["fuzz-valid"] == "verified"
    assert outcomes["fuzz-expired"] == "document_expired"
    assert outcomes["fuzz-other-nonce"] == "nonce_mismatch"
    assert outcomes["fuzz-wrong-cloud"] == "subject_mismatch"


@pytest.mark.slow
def test_bounded_fuzz_run_finds_no_new_crash(tmp_path: Path) -> None:
    tools.require_module("atheris")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "system" / "fuzz" / "fuzz_verify.py"),
         "--seconds", str(CI_FUZZ_SECONDS),
         "--corpus", str(tmp_path / "corpus"), "--artifacts", str(tmp_path / "artifacts"), "--known", "open"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CI_FUZZ_SECONDS + CI_FUZZ_MARGIN_SECONDS,
        check=False,
    )
    crashes = sorted(path.name for path in (tmp_path / "artifacts").glob("crash-*"))
    assert not crashes, (f"new crash {crashes}; save it under tests/system/fuzz/regressions/:\n"
                         f"{completed.stderr[-4000:]}")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Done" in completed.stderr or "stat::number_of_executed_units" in completed.stderr
