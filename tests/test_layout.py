"""The package's shape: imports point one way, the core stays pure, offline commands stay light, codes are whole.

The import graph is read from the source (every ``import`` and ``from ... import`` statement, deferred ones
included), so a cycle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attest_service
from attest_service import errors
from attest_service.web import errors as web_errors
from tests.support.azure_real import azure_real_dir, require

PACKAGE = Path(attest_service.__file__).parent
REPO_ROOT = PACKAGE.parent

#: The layers, top to bottom: a module may import its own layer and the layers below it, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("attest_service.cli", "attest_service.__main__"),
    ("attest_service.web", "attest_service.imds"),
    ("attest_service.server",),
    ("attest_service.callers",),
    ("attest_service.settings",),
    ("attest_service", "attest_service.library"),
    ("attest_service.attestation",),
    ("attest_service.results",),
    ("attest_service.callers.policy", "attest_service.nonces"),
    ("attest_service.trust",),
    ("attest_service.files", "attest_service.reloading"),
    ("attest_service.verify",),
    ("attest_service.clouds",),
    ("attest_service.errors", "attest_service.logsafe", "attest_service.logformat"),
)

#: What the service's runtime needs and the offline commands and the library must never load.
SERVER_ONLY = ("flask", "werkzeug", "gunicorn", "gevent", "redis", "prometheus_client")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every attest_service module ``path`` imports, resolved to the module (not the imported name)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from attest_service.trust import pins`` imports the submodule pins.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != module}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    best = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[1]:
                best = index, len(prefix)
    assert best[0] >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    # Package __init__ files are imported before their submodules by Python itself; an edge from a
    # submodule to its own package's __init__ is how a package re-exports, not a cycle of design.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target):], target] if target in trail else [module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_point_down_the_layers() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) < _layer(module) and not module.startswith(target + ".")
    )
    assert upward == []


def test_the_http_application_counts_no_budget_itself() -> None:
    # Who may call and how often is the callers' concern: the web layer wires it up and reports store errors
    # through the events it injects, but never counts a rate, a challenge or a failed key in the store itself.
    for path in sorted((PACKAGE / "web").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                assert node.attr not in {"hit_rate", "take", "authenticate"}, f"{path.name} counts a budget itself"


def test_the_core_imports_only_itself_the_errors_and_the_cloud_profiles() -> None:
    outside = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module.startswith("attest_service.verify")
        for target in targets
        if not target.startswith("attest_service.verify") and target not in ("attest_service.errors",
                                                                             "attest_service.clouds")
    )
    assert outside == []


def test_the_layer_table_covers_every_module() -> None:
    for module in _graph():
        _layer(module)


def _loaded_after(code: str) -> list[str]:
    probe = "\n".join(["import json, sys", textwrap.dedent(code),
                       'print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))'])
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return sorted(set(loaded) & set(SERVER_ONLY))


@pytest.mark.parametrize("argv", [
    ["verify", "--at", "2026-01-01T00:00:00Z", "-"],
    ["certs", "list"],
    ["certs", "check"],
], ids=lambda argv: " ".join(argv[:2]))
@pytest.mark.slow
def test_offline_commands_load_no_part_of_the_service_runtime(argv: list[str]) -> None:
    code = f"""
import io
sys.stdin = io.TextIOWrapper(io.BytesIO(b"not a document"))
from attest_service.cli import main
sys.stdout = io.StringIO()
main({argv!r})
sys.stdout = sys.__stdout__
"""
    assert _loaded_after(code) == []


@pytest.mark.slow
def test_the_library_loads_no_part_of_the_service_runtime() -> None:
    assert _loaded_after("from attest_service import Attestor, CallerPolicy, Verifier; Verifier.bundled()") == []


def _error_classes(root: type[errors.AttestError]) -> list[type[errors.AttestError]]:
    found: list[type[errors.AttestError]] = []
    for cls in root.__subclasses__():
        found += [cls, *_error_classes(cls)]
    return found


def _contract_codes() -> dict[str, int]:
    # The contract lives in shared/ beside the checkout, like the real documents: required under CI.
    contract = require(azure_real_dir().parent / "CONTRACT.md", "the external contract")
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", contract.read_text(encoding="utf-8"), re.MULTILINE)
    assert len(rows) >= 17
    return {code: int(status) for code, status in rows}


def test_every_contract_code_has_one_class_carrying_its_status() -> None:
    classes = {cls.code: cls for cls in _error_classes(errors.AttestError)}
    for code, status in _contract_codes().items():
        assert code in classes, f"no error class has code {code}"
        assert classes[code].http_status == status, code


def test_the_http_table_is_the_classes_own() -> None:
    for cls in _error_classes(errors.AttestError):
        # The VM-side client's errors are exit codes of `attest`, never answers of the service.
        if not issubclass(cls, errors.ConfigurationError) and not cls.__module__.startswith("attest_service.imds"):
            assert web_errors.STATUS_BY_CODE[cls.code] == cls.http_status


def test_every_refusal_of_a_document_names_its_step() -> None:
    for cls in _error_classes(errors.VerificationError):
        assert (cls.step or "x")[0].isdigit(), cls.__name__
    for cls in (errors.NonceReplayed, errors.NonceUnknown, errors.StoreUnavailable):
        assert (cls.step or "").startswith("10 "), cls.__name__


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in _error_classes(errors.AttestError)]
    assert len(codes) == len(set(codes))


def test_the_api_is_what_the_package_exports_and_readme_names() -> None:
    # The boundary of the library: attest_service.__all__, each name documented, and README's list the same.
    public = {name for name in attest_service.__all__ if name != "__version__"}
    assert [name for name in sorted(public) if not (getattr(attest_service, name).__doc__ or "").strip()] == []
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"^What is API: .*?\(its `__all__`: (.*?)\)", readme, re.MULTILINE | re.DOTALL)
    assert listed is not None, "README names the library's API"
    named = set(re.findall(r"`([A-Za-z_]+)`", listed.group(1)))
    errors_named = "the errors" in listed.group(1)
    exported_errors = {name for name in public if isinstance(getattr(attest_service, name), type)
                       and issubclass(getattr(attest_service, name), errors.AttestError)}
    assert named | (exported_errors if errors_named else set()) == public
