"""The built artefacts: the wheel carries every module and the pins, and the sdist rebuilds the same wheel."""

from __future__ import annotations

import tarfile
import tomllib
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .conftest import REPO_ROOT, build_context_rules

pytestmark = pytest.mark.slow


def wheel_files(wheel: Path) -> dict[str, bytes]:
    """The wheel's members outside its ``.dist-info``, by path, with their bytes."""
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist()
                if not name.split("/", 1)[0].endswith(".dist-info") and not name.endswith("/")}


def tree_files(root: Path, prefix: str) -> dict[str, bytes]:
    """Files under ``root`` (without what ``.dockerignore`` excludes everywhere), as wheel paths ``prefix/...``."""
    _, excluded = build_context_rules()
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part_matches(part, excluded) for part in relative.parts):
            found[f"{prefix}/{relative.as_posix()}"] = path.read_bytes()
    return found


def part_matches(part: str, patterns: list[str]) -> bool:
    """Whether one path component matches a ``.dockerignore`` ``**/PATTERN`` rule."""
    return any(Path(part).match(pattern) for pattern in patterns)


def test_wheel_holds_every_module_and_every_pin_of_the_tree(wheel: Path) -> None:
    # A subpackage missing from pyproject's explicit packages list, or a pin file outside the package-data
    # globs, would be missing here; the pins are the top-level pinned_certs/ under attest_service/.
    expected = {**tree_files(REPO_ROOT / "attest_service", "attest_service"),
                **tree_files(REPO_ROOT / "pinned_certs", "attest_service/pinned_certs")}
    actual = wheel_files(wheel)
    assert sorted(set(expected) - set(actual)) == [], "in the tree, not in the wheel"
    assert sorted(set(actual) - set(expected)) == [], "in the wheel, not in the tree"
    assert [name for name in expected if actual[name] != expected[name]] == []
    assert "attest_service/pinned_certs/manifest.json" in actual


def test_wheel_declares_the_dependencies_of_pyproject(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        headers = HeaderParser().parsestr(archive.read(metadata).decode("utf-8"))
    runtime = {str(Requirement(line)) for line in headers.get_all("Requires-Dist", []) if "extra ==" not in line}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert runtime == {str(Requirement(line)) for line in project["dependencies"]}
    assert "gunicorn[gevent]>=22.0" in runtime


def test_sdist_carries_the_pins_and_builds_the_same_wheel(sdist: Path, wheel: Path, wheel_from_sdist: Path) -> None:
    # A user installing from the source archive gets the same files, pins included, as the wheel's user.
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {name.removeprefix("attest_service/") for name in wheel_files(wheel)
            if name.startswith("attest_service/pinned_certs/")} <= names
    assert wheel_files(wheel_from_sdist) == wheel_files(wheel)
