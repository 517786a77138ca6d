"""README's commands, run exactly as printed, from a fresh copy of the repository with the package installed.

The blocks README marks ``<!-- readme-run: NAME -->`` are shell recipes a new user types; the blocks marked
``<!-- library-example -->`` are Python a license server copies. Each runs here as written:

- the shell recipes in a copy of the tracked files (what a fresh clone holds) whose ``.venv`` is a plain
  ``pip install <wheel>`` of the project, inside a network namespace of their own, so that README's fixed
  ports (8080, 8090, 8181) are theirs alone and nothing else on the machine answers them;
- the Python examples with the installed interpreter, from a directory outside the repository, against a real
  document Azure signed (``response.json``), which is the whole point: a generated document proves nothing
  about the instant or the bundled pins.

Background processes a recipe starts (``&``) run in the recipe's own session and are ended with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Final

import pytest

from tests.support import tools
from tests.support.azure_real import real_documents

from .conftest import REPO_ROOT, Installation, child_env

pytestmark = pytest.mark.slow

README: Final = REPO_ROOT / "README.md"
#: Seconds a recipe may take: the emulator generates its PKI, gunicorn starts its workers.
RECIPE_TIMEOUT_SECONDS: Final = 120
#: The real document the library examples name, and the instant they verify it at.
LIBRARY_DOCUMENT: Final = "coder-2026-06-25-microsoft-tls-g2-rsa-ca-ocsp-02.json"
LIBRARY_VM_ID: Final = "dc18de58-292f-4794-9a5d-a4192bad0039"
LIBRARY_ISSUER: Final = "CN=Microsoft TLS G2 RSA CA OCSP 02,O=Microsoft Corporation,C=US"


def readme_blocks(marker: str, language: str) -> list[str]:
    """The code blocks of README that follow ``<!-- marker -->``, in order."""
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"<!-- {re.escape(marker)} -->\n```{language}\n(.*?)```", text, re.DOTALL)


def make_run_command() -> str:
    """The command ``make run`` serves with, from the Makefile, with ``$(BIN)`` spelled as README's ``.venv/bin``."""
    recipe = (REPO_ROOT / "Makefile").read_text(encoding="utf-8").split("\nrun:", 1)[1]
    command = next(line.strip() for line in recipe.splitlines()[1:] if line.startswith("\t"))
    return command.replace("$(BIN)", ".venv/bin").replace("$$", "$")


def _namespaces_or_skip() -> None:
    """Skip (fail under CI) where this machine cannot give a recipe a network namespace of its own."""
    reason = ""
    if shutil.which("unshare") is None or shutil.which("ip") is None or shutil.which("curl") is None:
        reason = "README's recipes need unshare, ip and curl"
    else:
        probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, check=False)
        if probe.returncode != 0:
            reason = f"cannot create a network namespace ({probe.stderr.decode(errors='replace').strip()[:200]})"
    if reason:
        tools.missing(reason)


@pytest.fixture(scope="module")
def clone(plain_installation: Installation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tracked files of the repository (a fresh clone's content), with the installed package as ``.venv``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    root = tmp_path_factory.mktemp("clone") / "attest-service"
    for name in filter(None, listed.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a file deleted in the working tree but not yet from the index is not there
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(plain_installation.venv)
    return root


def run_recipe(script: str, cwd: Path, log: Path) -> tuple[int, str]:
    """Run ``script`` with bash (``set -e``) in a network namespace of its own; return its status and output.

    Output goes to a file, not a pipe, since the recipe's background processes outlive it; they are ended
    with the recipe's whole session afterwards.
    """
    wrapped = f"ip link set lo up\nset -e\n{script}"
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(["unshare", "--net", "bash", "-c", wrapped], cwd=cwd, env=child_env(),
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=RECIPE_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            status = -1
        finally:
            _end_session(process.pid)
    return status, log.read_text(encoding="utf-8", errors="replace")


def _end_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        subprocess.run(["sleep", "0.1"], check=False)
    os.killpg(pgid, signal.SIGKILL)


def _json_objects(output: str) -> list[dict[str, object]]:
    """Every JSON object printed in ``output``, whether on one line or indented over several."""
    decoder = json.JSONDecoder()
    found: list[dict[str, object]] = []
    index = 0
    while (start := output.find("{", index)) != -1:
        try:
            value, end = decoder.raw_decode(output, start)
        except ValueError:
            index = start + 1
            continue
        if isinstance(value, dict):
            found.append(value)
        index = end
    return found


def test_readme_marks_the_recipes_and_examples() -> None:
    assert len(readme_blocks("readme-run: quick-start", "sh")) == 1
    assert len(readme_blocks("readme-run: emulator", "sh")) == 2
    assert len(readme_blocks("library-example", "python")) == 2


def test_quick_start_runs_as_printed(clone: Path, tmp_path: Path) -> None:
    _namespaces_or_skip()
    # `make run` in the first shell (its serving command; installing is the Makefile's business), the
    # block in the second once the service answers.
    [block] = readme_blocks("readme-run: quick-start", "sh")
    script = (f"{make_run_command()} > {tmp_path / 'serve.log'} 2>&1 &\n"
              "curl -sf --retry 30 --retry-connrefused --retry-delay 1 -o /dev/null http://127.0.0.1:8080/readyz\n"
              f"{block}")
    status, output = run_recipe(script, clone, tmp_path / "recipe.log")
    assert status == 0, output
    objects = _json_objects(output)
    challenge = next(item for item in objects if "expiresAt" in item)
    assert re.fullmatch(r"[A-Za-z0-9_-]{24}", str(challenge["nonce"]))
    assert '"openapi"' in output
    verdict = objects[-1]
    assert verdict["verified"] is True, output
    assert verdict["cloud"] == "public"


def test_emulator_recipe_runs_as_printed(clone: Path, tmp_path: Path) -> None:
    _namespaces_or_skip()
    script = "\n".join(readme_blocks("readme-run: emulator", "sh"))
    status, output = run_recipe(script, clone, tmp_path / "recipe.log")
    assert status == 0, output
    verdicts = [item for item in _json_objects(output) if "verified" in item]
    # attest, the first submission, the replay, the offline verify.
    assert [item["verified"] for item in verdicts] == [True, True, False, True], output
    replay = verdicts[2]["error"]
    assert isinstance(replay, dict)
    assert replay["code"] == "nonce_replayed"
    claims = verdicts[3]["claims"]
    assert isinstance(claims, dict)
    assert claims["nonce"] == "abc123"


@pytest.mark.parametrize("index", [0, 1])
def test_library_example_runs_as_written(index: int, plain_installation: Installation, tmp_path: Path) -> None:
    documents = real_documents()
    shutil.copyfile(documents / LIBRARY_DOCUMENT, tmp_path / "response.json")
    (tmp_path / "example.py").write_text(readme_blocks("library-example", "python")[index], encoding="utf-8")
    result = subprocess.run([str(plain_installation.venv / "bin" / "python"), "example.py"], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True, timeout=RECIPE_TIMEOUT_SECONDS,
                            check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if index == 0:
        assert lines == [f"public {LIBRARY_VM_ID} {LIBRARY_ISSUER}"], result.stdout
    else:
        assert lines == [f"licensed: {LIBRARY_VM_ID}", "refused: nonce_replayed"], result.stdout
