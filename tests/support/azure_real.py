"""Real Azure material for the tests: where it lives, and what its absence means.

Documents signed by Azure and Azure's published certificates live outside the repository and are never
copied into it: ``$ATTEST_AZURE_REAL_DIR``, else ``../shared/azure-real`` beside the clone (certificates in
``azure-certs`` next to it). ``documents/expected.json`` lists each document with its cloud, an instant inside
its signer's validity and the exact signed claims.

On a developer's machine a missing directory skips the tests that need it, saying where it was looked for.
Under CI (``CI=true``; :mod:`tests.support.tools` says which values count) the material is beside the clone by
construction, so a missing directory fails those tests instead: a green CI run has always verified real documents.
Every test that needs the material goes through :func:`unavailable` (or :func:`require`, :func:`real_documents`).

Tests parametrized over the documents use :func:`entry_params`; when the list is absent it yields one
placeholder parameter, and such tests must request a fixture that calls :func:`real_documents`, which skips
or fails before the test body sees the placeholder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import pytest

from tests.support import tools

if TYPE_CHECKING:
    from _pytest.mark import ParameterSet

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
#: Environment variable naming the directory of real Azure material.
AZURE_REAL_ENV: Final = "ATTEST_AZURE_REAL_DIR"


def azure_real_dir() -> Path:
    """The real Azure material: ``$ATTEST_AZURE_REAL_DIR``, else ``../shared/azure-real`` beside the clone."""
    configured = os.environ.get(AZURE_REAL_ENV)
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "azure-real"


def azure_certs_dir() -> Path:
    """Azure's published certificates: ``azure-certs`` beside the real documents' directory."""
    return azure_real_dir().parent / "azure-certs"


def required() -> bool:
    """Whether the real material must be present: under CI (``CI=true``) it is, so its absence is a failure."""
    return tools.under_ci()


def unavailable(reason: str) -> NoReturn:
    """Skip the current test because real material is missing, or fail it under CI; ``reason`` says what."""
    if required():
        pytest.fail(f"{reason}; CI=true requires the real Azure material (set {AZURE_REAL_ENV})", pytrace=False)
    pytest.skip(f"{reason} (set {AZURE_REAL_ENV})")


def require(path: Path, what: str) -> Path:
    """``path`` if it exists; otherwise :func:`unavailable`, naming ``what`` and where it was looked for."""
    if not path.exists():
        unavailable(f"{what} not found at {path}")
    return path


def real_documents() -> Path:
    """The directory of real documents (it holds ``expected.json``); :func:`unavailable` when it is missing."""
    documents = azure_real_dir() / "documents"
    require(documents / "expected.json", "real Azure documents")
    return documents


def expected_entries() -> list[dict[str, Any]]:
    """The entries of ``documents/expected.json``, or an empty list when it is missing (collection time)."""
    path = azure_real_dir() / "documents" / "expected.json"
    if not path.is_file():
        return []
    entries: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return entries


def entry_params(entries: list[dict[str, Any]] | None = None) -> list[ParameterSet]:
    """One parameter per real document (named after its file), or a placeholder when there are none.

    A test parametrized with these must also request a fixture that calls :func:`real_documents`: with the
    documents absent, that fixture skips (or, under CI, fails) the placeholder.
    """
    listed = expected_entries() if entries is None else entries
    return [pytest.param(entry, id=str(entry["document"]).removesuffix(".json")) for entry in listed] or [
        pytest.param(None, id="real-documents-absent")]
