"""The image's dependency install checks every wheel against the hashes constraints.txt records.

``scripts/install-runtime.sh dependencies`` (the Dockerfile's builder step) installs with pip's
``--require-hashes``: a pin without a hash, or a wheel whose bytes match none of the pin's hashes, stops the
install before anything is installed. Here with one small pinned wheel from the configured index, the way the
image's build gets it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import CONSTRAINTS, INSTALL_SCRIPT, INSTALL_TIMEOUT_SECONDS, run
from .test_constraints import read_entries

pytestmark = pytest.mark.slow

#: A pure-Python runtime dependency with one wheel: cheap to install.
PACKAGE = "blinker"


def _install(tmp_path: Path, constraints: str) -> tuple[int, str]:
    path = tmp_path / "constraints.txt"
    path.write_text(constraints, encoding="utf-8")
    result = run(["bash", str(INSTALL_SCRIPT), "dependencies", str(tmp_path / "venv"), str(path)],
                 timeout=INSTALL_TIMEOUT_SECONDS, PYTHON=sys.executable)
    return result.returncode, result.stdout + result.stderr


def _installed(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "venv").glob(f"lib/python*/site-packages/{PACKAGE}"))


@pytest.fixture(scope="module")
def pin() -> tuple[str, frozenset[str]]:
    version, hashes = read_entries(CONSTRAINTS.read_text(encoding="utf-8"))[PACKAGE]  # type: ignore[index]
    return str(version), hashes


def test_the_recorded_hash_installs(tmp_path: Path, pin: tuple[str, frozenset[str]]) -> None:
    version, hashes = pin
    lines = " ".join(f"--hash=sha256:{digest}" for digest in sorted(hashes))
    code, output = _install(tmp_path, f"{PACKAGE}=={version} {lines}\n")
    assert code == 0, output
    assert _installed(tmp_path)


def test_a_wheel_matching_no_recorded_hash_is_refused(tmp_path: Path, pin: tuple[str, frozenset[str]]) -> None:
    version, _ = pin
    code, output = _install(tmp_path, f"{PACKAGE}=={version} --hash=sha256:{'0' * 64}\n")
    assert code != 0
    assert "DO NOT MATCH THE HASHES" in output
    assert not _installed(tmp_path)


def test_a_pin_without_a_hash_is_refused(tmp_path: Path, pin: tuple[str, frozenset[str]]) -> None:
    version, _ = pin
    code, output = _install(tmp_path, f"{PACKAGE}=={version}\n")
    assert code != 0
    assert "Hashes are required in --require-hashes mode" in output
    assert not _installed(tmp_path)
