"""Shared fixtures of the verification tests: the generated cases and the real Azure documents."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from attest_service.trust import TrustStore, load_trust
from attest_service.verify import VerificationPolicy
from tests.support import azure_real

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "tests" / "assets"
TESTCASES = ASSETS / "testcases"


def load_index() -> dict[str, dict[str, Any]]:
    """The generated cases, by name (see tests/assets/build_testcases.py)."""
    cases: dict[str, dict[str, Any]] = json.loads((TESTCASES / "index.json").read_text(encoding="utf-8"))["cases"]
    return cases


def case_input(case: dict[str, Any]) -> bytes:
    """The file a caller would pass for ``case``."""
    return (TESTCASES / case["file"]).read_bytes()


def case_policy(case: dict[str, Any]) -> VerificationPolicy:
    """The policy ``case`` is verified under."""
    return VerificationPolicy(cloud=case["policy"]["cloud"], expected_nonce=case["policy"]["nonce"],
                              revocation=case["policy"].get("revocation", "soft"))


def case_instant(case: dict[str, Any]) -> datetime:
    """The instant ``case`` is verified at."""
    return datetime.fromisoformat(case["at"])


@pytest.fixture(scope="session")
def test_trust() -> TrustStore:
    """The trust directory the generated cases chain to."""
    return load_trust(TESTCASES / "pinned")


@pytest.fixture(scope="session")
def real_documents() -> Path:
    """The real documents directory; skips when it is not available (under CI, fails)."""
    return azure_real.real_documents()
