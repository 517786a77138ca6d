"""The installed artefact: the wheel built once per session, and the two environments users get from it.

- ``image``: the container image's environment, made by ``scripts/install-runtime.sh`` exactly as the
  Dockerfile's builder stage makes it (the pinned set from wheels only, the project's wheel with
  ``--no-deps --no-index``, ``pip check``);
- ``plain``: ``python -m venv`` and ``pip install <wheel>``, dependencies resolved from the index as configured,
  which is what a user of ``pip install attest-service`` gets.

The wheel is built with ``pip wheel --no-deps`` (the Dockerfile's command) from a copy of the image's build
context, i.e. the files ``.dockerignore`` admits, so a file the build needs but the context lacks fails
here too. Every command of an installation runs its own console script, from a working directory outside
the repository, with no ``PYTHONPATH`` and none of the caller's ``ATTEST_*`` variables: nothing of the source
tree or of the development venv can stand in for what was installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
INSTALL_SCRIPT: Final = REPO_ROOT / "scripts" / "install-runtime.sh"
CONSTRAINTS: Final = REPO_ROOT / "constraints.txt"
#: Seconds a build (isolated build environment, setuptools from the index) may take.
BUILD_TIMEOUT_SECONDS: Final = 300
#: Seconds installing one environment may take (about 15 s here, from the local index).
INSTALL_TIMEOUT_SECONDS: Final = 600
#: Seconds one command of an installation may take (``verify`` takes under a second).
COMMAND_TIMEOUT_SECONDS: Final = 60
#: Seconds the emulator may take to generate its PKI and print where it listens.
EMULATOR_START_TIMEOUT_SECONDS: Final = 30
#: Variables that could route a child's requests elsewhere, or make another package importable in it.
_DROPPED_VARIABLES: Final = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                                       "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                                       "all_proxy", "ALL_PROXY", "PROMETHEUS_MULTIPROC_DIR"})


def child_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Python path, proxy or ``ATTEST_*`` settings, plus ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if key not in _DROPPED_VARIABLES and not key.startswith("ATTEST_")}
    env.update(extra)
    return env


def run(argv: list[str], *, timeout: float, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion with :func:`child_env`; the caller asserts on the result."""
    return subprocess.run(argv, cwd=cwd, env=child_env(**env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_ok(argv: list[str], *, timeout: float, cwd: Path | None = None, **env: str) -> str:
    """:func:`run`, failing the test with the output when ``argv`` exits non-zero; returns standard output."""
    result = run(argv, timeout=timeout, cwd=cwd, **env)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
                    pytrace=False)
    return result.stdout


def build_context_rules() -> tuple[list[str], list[str]]:
    """``.dockerignore`` read as (admitted top-level paths, file-name patterns excluded everywhere)."""
    admitted: list[str] = []
    excluded: list[str] = []
    for raw in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#") or rule == "*":
            continue
        if rule.startswith("!"):
            admitted.append(rule[1:].rstrip("/"))
        elif rule.startswith("**/"):
            excluded.append(rule.removeprefix("**/"))
        else:
            raise AssertionError(f".dockerignore rule {rule!r} is not understood by tests/system/install/conftest.py")
    return admitted, excluded


@pytest.fixture(scope="session")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the image build sees: the repository filtered by ``.dockerignore``."""
    context = tmp_path_factory.mktemp("context")
    admitted, excluded = build_context_rules()
    ignore = shutil.ignore_patterns(*excluded)
    for name in admitted:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=ignore)
        else:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / name)
    return context


@pytest.fixture(scope="session")
def wheel_dir(build_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the project's one wheel, built as the Dockerfile builds it."""
    wheels = tmp_path_factory.mktemp("wheels")
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--wheel-dir", str(wheels),
            str(build_context)], timeout=BUILD_TIMEOUT_SECONDS)
    return wheels


@pytest.fixture(scope="session")
def wheel(wheel_dir: Path) -> Path:
    """The project's wheel."""
    [built] = wheel_dir.glob("attest_service-*.whl")
    return built


@pytest.fixture(scope="session")
def sdist(build_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source distribution, built with ``python -m build --sdist`` in an isolated environment."""
    out = tmp_path_factory.mktemp("sdist")
    run_ok([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(build_context)],
           timeout=BUILD_TIMEOUT_SECONDS)
    [built] = out.glob("attest_service-*.tar.gz")
    return built


@pytest.fixture(scope="session")
def wheel_from_sdist(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the sdist alone, as pip does for a user who installs from the source archive."""
    out = tmp_path_factory.mktemp("sdist-wheel")
    run_ok([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--wheel-dir", str(out), str(sdist)],
           timeout=BUILD_TIMEOUT_SECONDS)
    [built] = out.glob("attest_service-*.whl")
    return built


@dataclass(frozen=True, slots=True)
class Installation:
    """One environment with the project installed, and a working directory outside the repository."""

    name: str
    venv: Path
    workdir: Path

    @property
    def script(self) -> str:
        """The installed ``attest-service`` console script."""
        return str(self.venv / "bin" / "attest-service")

    def run(self, *arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``attest-service ARGUMENTS`` from the working directory, with :func:`child_env` plus ``env``."""
        return run([self.script, *arguments], cwd=self.workdir, timeout=COMMAND_TIMEOUT_SECONDS, **env)

    def python(self, code: str) -> str:
        """Standard output of the environment's interpreter running ``code`` from the working directory."""
        return run_ok([str(self.venv / "bin" / "python"), "-c", code], cwd=self.workdir,
                      timeout=COMMAND_TIMEOUT_SECONDS)


@pytest.fixture(scope="session")
def image_installation(wheel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """The image's environment, made by the script the Dockerfile runs, step for step."""
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"
    script = ["bash", str(INSTALL_SCRIPT)]
    run_ok([*script, "dependencies", str(venv), str(CONSTRAINTS)], timeout=INSTALL_TIMEOUT_SECONDS,
           PYTHON=sys.executable)
    run_ok([*script, "project", str(venv), str(wheel_dir)], timeout=INSTALL_TIMEOUT_SECONDS, PYTHON=sys.executable)
    (root / "work").mkdir()
    return Installation("image", venv, root / "work")


@pytest.fixture(scope="session")
def plain_installation(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installation:
    """``python -m venv`` and ``pip install <wheel>``: dependencies from the index, no constraints, no extras."""
    root = tmp_path_factory.mktemp("plain")
    venv = root / "venv"
    run_ok([sys.executable, "-m", "venv", str(venv)], timeout=INSTALL_TIMEOUT_SECONDS)
    run_ok([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-cache-dir",
            str(wheel)], timeout=INSTALL_TIMEOUT_SECONDS)
    (root / "work").mkdir()
    return Installation("plain", venv, root / "work")


@pytest.fixture(scope="session", params=["image", "plain"])
def installation(request: pytest.FixtureRequest) -> Installation:
    """Each installation in turn (the tests of one run before the other is made)."""
    found: Installation = request.getfixturevalue(f"{request.param}_installation")
    return found


@dataclass(frozen=True, slots=True)
class Emulator:
    """A running ``imds-emulator`` of an installation: where it listens and the PKI it pinned."""

    url: str
    pki_dir: Path


@contextlib.contextmanager
def imds_emulator(installation: Installation, pki_dir: Path) -> Iterator[Emulator]:
    """``attest-service imds-emulator`` of ``installation`` on a free loopback port, stopped on exit."""
    process = subprocess.Popen(
        [installation.script, "imds-emulator", "--bind", "127.0.0.1:0", "--pki-dir", str(pki_dir)],
        cwd=installation.workdir, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = _first_line(process)
        yield Emulator(url=json.loads(line)["url"], pki_dir=pki_dir)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _first_line(process: subprocess.Popen[str]) -> str:
    """The emulator's "listening" line; fails with its standard error when it exits or stays silent."""
    assert process.stdout is not None
    # readline() alone could wait forever on an emulator that hangs before listening.
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=EMULATOR_START_TIMEOUT_SECONDS)
    line = process.stdout.readline() if ready else ""
    if not line:
        exited = process.poll() is not None
        stderr = process.stderr.read() if exited and process.stderr is not None else "(no exit, no output)"
        pytest.fail(f"imds-emulator did not start (exit {process.poll()}):\n{stderr[-3000:]}", pytrace=False)
    return line
