"""constraints.txt pins everything the runtime needs: the declared dependencies and all they require in turn.

The image installs constraints.txt and then the project's wheel with ``--no-deps``; ``pip check`` there
does not see a requirement of an extra (gunicorn's ``gevent`` extra needs ``packaging``), so a missing pin
only showed when gunicorn failed to load its worker. These tests walk the requirement graph instead: from
pyproject.toml's ``[project].dependencies`` through each distribution's ``Requires-Dist``, markers evaluated
for this interpreter and the extras requested on the way, and require every name reached to be pinned at a
version every requirement on it accepts. No network: the metadata read is the installed distributions' of
the development venv, which ``make`` installs with the same constraints (checked first).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[3]
CONSTRAINTS = REPO_ROOT / "constraints.txt"


#: The one option a line of constraints.txt may carry: the SHA-256 of a wheel that may install the pin.
_HASH_OPTION = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """The lines of a requirements file with backslash continuations joined, comments and blanks left out.

    Each comes with the number of the physical line it starts on.
    """
    found: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line.removesuffix("\\").strip())
        if not continued:
            found.append((start, " ".join(part for part in pending if part)))
            pending = []
    assert not pending, "constraints.txt ends inside a continued line"
    return found


def read_entries(text: str) -> dict[NormalizedName, tuple[Version, frozenset[str]]]:
    """Each pin of a constraints file, by normalized name: its version and the wheel hashes recorded for it.

    A pin is ``name==version`` followed by nothing but ``--hash=sha256:HEX`` options; anything else is an error.
    """
    entries: dict[NormalizedName, tuple[Version, frozenset[str]]] = {}
    for number, line in logical_lines(text):
        requirement_text, *rest = re.split(r"\s+(?=--)", line, maxsplit=1)
        options = rest[0].split() if rest else []
        requirement = Requirement(requirement_text)
        specifiers = list(requirement.specifier)
        exact = len(specifiers) == 1 and specifiers[0].operator == "==" and not requirement.marker
        assert exact, f"constraints.txt line {number}: {line!r} is not an exact pin (name==version)"
        hashes = [_HASH_OPTION.fullmatch(option) for option in options]
        assert all(hashes), f"constraints.txt line {number}: only --hash=sha256:HEX may follow the pin: {line!r}"
        name = canonicalize_name(requirement.name)
        assert name not in entries, f"constraints.txt line {number}: {requirement.name} is pinned twice"
        entries[name] = (Version(specifiers[0].version), frozenset(match.group(1) for match in hashes if match))
    return entries


def read_pins(text: str) -> dict[NormalizedName, Version]:
    """The pins of a constraints file, by normalized name (:func:`read_entries` without the hashes)."""
    return {name: version for name, (version, _) in read_entries(text).items()}


def declared_dependencies() -> list[Requirement]:
    """pyproject.toml's ``[project].dependencies``: what ``pip install attest-service`` asks for."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(line) for line in project["dependencies"]]


@dataclass(frozen=True, slots=True)
class Reached:
    """A requirement met on the walk, and the chain of requirements that led to it (for messages)."""

    requirement: Requirement
    via: tuple[str, ...]

    def describe(self) -> str:
        """``gunicorn[gevent]>=22.0 -> packaging`` style: from the declared dependency down to this one."""
        return " -> ".join((*self.via, str(self.requirement)))


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` holds here for at least one of ``extras`` ("" standing for no extra)."""
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras)


def walk(roots: list[Requirement]) -> list[Reached]:
    """Every requirement reachable from ``roots`` on this platform, with the extras requested on the way.

    A requirement applies when its marker holds for this interpreter with ``extra`` set to "" or to one of
    the extras requested of its distribution (``gunicorn[gevent]`` makes ``packaging; extra == "gevent"``
    apply). Distributions are read from the installed metadata; one that is not installed is reported by
    the caller as unpinned or as missing from the environment, never silently skipped.
    """
    reached: list[Reached] = []
    queue = deque(Reached(requirement, ()) for requirement in roots)
    expanded: dict[NormalizedName, set[str]] = {}
    while queue:
        item = queue.popleft()
        requirement = item.requirement
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        reached.append(item)
        name = canonicalize_name(requirement.name)
        wanted = {""} | {canonicalize_name(extra) for extra in requirement.extras}
        done = expanded.setdefault(name, set())
        if wanted <= done:
            continue
        before = set(done)
        done |= wanted
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in distribution.requires or []:
            child = Requirement(line)
            # Only what the newly requested extras add: the rest was queued when this name was first met.
            if _applies(child, done) and not (before and _applies(child, before)):
                # The marker has done its job; the child is judged by its name, extras and specifier.
                child.marker = None
                queue.append(Reached(child, (*item.via, str(requirement))))
    return reached


def problems(pins: dict[NormalizedName, Version], roots: list[Requirement]) -> list[str]:
    """What is wrong with ``pins`` as the complete runtime set for ``roots``: unpinned names, rejected pins."""
    found: list[str] = []
    for item in walk(roots):
        name = canonicalize_name(item.requirement.name)
        if name not in pins:
            found.append(f"{item.requirement.name} is not pinned (needed by {item.describe()})")
        elif not item.requirement.specifier.contains(pins[name], prereleases=True):
            found.append(f"{name}=={pins[name]} does not satisfy {item.describe()}")
    return sorted(set(found))


@pytest.fixture(scope="module")
def pins() -> dict[NormalizedName, Version]:
    return read_pins(CONSTRAINTS.read_text(encoding="utf-8"))


def test_the_metadata_walked_is_that_of_the_pinned_versions(pins: dict[NormalizedName, Version]) -> None:
    # The walk reads Requires-Dist of the installed distributions: they must be the pinned releases, or the
    # graph checked is another one (make installs the development venv with --constraint constraints.txt).
    differing = []
    for name, version in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            differing.append(f"{name} is pinned but not installed")
            continue
        if installed != version:
            differing.append(f"{name} {installed} is installed, {version} pinned")
    assert not differing, "reinstall the venv with make (it installs --constraint constraints.txt): " + "; ".join(
        differing)


def test_every_runtime_requirement_is_pinned_at_an_accepted_version(pins: dict[NormalizedName, Version]) -> None:
    assert problems(pins, declared_dependencies()) == []


def test_every_pin_is_a_runtime_requirement(pins: dict[NormalizedName, Version]) -> None:
    # A pin nothing requires is code the image installs for no reason; usually a dependency was dropped
    # without regenerating constraints.txt.
    reached = {canonicalize_name(item.requirement.name) for item in walk(declared_dependencies())}
    assert sorted(set(pins) - reached) == []


def test_an_extra_requirement_missing_from_the_pins_is_found(pins: dict[NormalizedName, Version]) -> None:
    # The case pip check cannot see: gunicorn[gevent] requires packaging only through its extra.
    without = {name: version for name, version in pins.items() if name != "packaging"}
    found = problems(without, declared_dependencies())
    assert any(message.startswith("packaging is not pinned (needed by gunicorn[gevent]") for message in found), found
    # Without the extra the same pins are complete: the walk follows extras only where they are requested.
    plain = [Requirement("gunicorn>=22.0") if r.name == "gunicorn" else r for r in declared_dependencies()]
    assert problems(without, plain) == []


def test_a_pin_outside_a_specifier_is_found(pins: dict[NormalizedName, Version]) -> None:
    # Flask requires Werkzeug>=3.1.0 (Flask 3.1's metadata); an older pin must be named with the chain.
    older = {**pins, canonicalize_name("werkzeug"): Version("2.3.8")}
    found = problems(older, declared_dependencies())
    assert any(message.startswith("werkzeug==2.3.8 does not satisfy flask>=3.0 -> werkzeug>=") for message in found), (
        found)


def test_constraints_lines_must_be_exact_pins() -> None:
    assert read_pins("# comment\n\nFlask==3.1.3\nzope.event==6.2\n") == {"flask": Version("3.1.3"),
                                                                        "zope-event": Version("6.2")}
    for bad in ("flask>=3.0", "flask==3.1.3; python_version < '3'", "flask"):
        with pytest.raises(AssertionError, match="not an exact pin"):
            read_pins(bad)
    digest = "ab" * 32
    assert read_entries(f"# c\nFlask==3.1.3 \\\n    --hash=sha256:{digest} \\\n    --hash=sha256:{'cd' * 32}\n") == {
        "flask": (Version("3.1.3"), frozenset({digest, "cd" * 32}))}
    for bad in (f"flask==3.1.3 --hash=md5:{digest}", "flask==3.1.3 --index-url=http://x", "flask==3.1.3 \\"):
        with pytest.raises(AssertionError):
            read_entries(bad)


def test_every_pin_carries_the_hashes_of_its_wheels() -> None:
    # The image installs constraints.txt with pip --require-hashes (scripts/install-runtime.sh): a pin without a
    # hash stops that install; scripts/hash-constraints.sh records them.
    unhashed = sorted(name for name, (_, hashes) in read_entries(CONSTRAINTS.read_text(encoding="utf-8")).items()
                      if not hashes)
    assert unhashed == []
