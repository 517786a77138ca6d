"""README's reference tables say what the code does: every variable, command and route, and nothing else.

A reader looks a setting, a command or a route up in README's tables; when a change adds one and forgets the
table, or renames one and leaves the old row, the reader is misled. These tests read the tables and compare
them with the code: the ``ATTEST_*`` names the package reads and the defaults the settings take (which the
chart's ``settings`` must ship too), the command line's parser, the Flask application's routes and the
OpenAPI document it serves, the package's modules.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import yaml

from attest_service.cli import build_parser
from attest_service.settings import Settings
from attest_service.web import create_app

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
PACKAGE: Final = REPO_ROOT / "attest_service"
README: Final = REPO_ROOT / "README.md"

_VARIABLE: Final = re.compile(r"ATTEST_[A-Z0-9_]+")
#: Methods every route answers by itself (werkzeug adds them), which README does not list route by route.
_IMPLICIT_METHODS: Final = frozenset({"HEAD", "OPTIONS"})


def _cells(line: str) -> list[str]:
    """The cells of one table row; ``\\|`` inside a cell is text, not a separator."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def table(heading: str, text: str | None = None) -> list[list[str]]:
    """The body rows of the first table under README's ``## heading`` (its header and rule left out)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"README has no section {heading!r}"
    lines = match.group(1).splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    rows: list[str] = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return [_cells(row) for row in rows[2:]]


def variables_read() -> set[str]:
    """Every ``ATTEST_*`` name the package's code holds as a whole string: the variables it reads.

    Names only mentioned in a message or a docstring are part of a longer string and do not count.
    """
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _VARIABLE.fullmatch(node.value):
                names.add(node.value)
    return names


def configuration_rows(text: str | None = None) -> dict[str, list[str]]:
    """README's configuration table: variable -> its cells."""
    rows = table("Configuration (environment)", text)
    listed = {}
    for cells in rows:
        match = re.fullmatch(r"`(ATTEST_[A-Z0-9_]+)`", cells[0])
        assert match is not None, f"not a variable: {cells[0]!r}"
        assert match.group(1) not in listed, f"{match.group(1)} is listed twice"
        listed[match.group(1)] = cells
    return listed


def test_the_configuration_table_lists_every_variable_read_and_no_other() -> None:
    listed = set(configuration_rows())
    read = variables_read()
    assert read, "the package reads no ATTEST_* variable: the scan is broken"
    assert sorted(read - listed) == [], "read by the code, missing from README's configuration table"
    assert sorted(listed - read) == [], "in README's configuration table, read by nothing"


def _plain_default(cell: str) -> str | None:
    """The default of a row when it is one plain value (``10``, ``soft``, ``json (make run: text)``), else None."""
    value = cell.split(" (", 1)[0].strip().strip("`")
    if value == "none" or not re.fullmatch(r"[\w.:/-]+", value):
        return None
    return value


def _with(env: dict[str, str], name: str, value: str) -> dict[str, str]:
    return {**env, name: value}


def test_each_plain_default_in_the_configuration_table_is_the_one_the_settings_take() -> None:
    # Giving a variable the value README calls its default must configure exactly what leaving it unset does.
    base: dict[str, str] = {}
    unset = Settings.from_env(base)
    checked = {}
    for name, cells in configuration_rows().items():
        default = _plain_default(cells[-1])
        if default is not None:
            checked[name] = default
    assert len(checked) >= 15, f"too few defaults read from the table: {checked}"
    wrong = {name: default for name, default in checked.items()
             if Settings.from_env(_with(base, name, default)) != unset}
    assert wrong == {}, "README's default differs from the one the service takes"


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not actions:
        yield path
        return
    for name, subparser in actions[0].choices.items():
        yield from _leaf_commands(subparser, (*path, name))


def command_rows(text: str | None = None) -> set[tuple[str, ...]]:
    """README's command table: the command words of each row (``certs crls fetch``), options left out."""
    commands = set()
    for cells in table("Commands", text):
        match = re.match(r"`attest-service ((?:[a-z][a-z-]*(?: |`))+)", cells[0])
        assert match is not None, f"not a command: {cells[0]!r}"
        commands.add(tuple(match.group(1).rstrip("` ").split()))
    return commands


def test_the_command_table_lists_every_command_and_subcommand_and_no_other() -> None:
    parsed = set(_leaf_commands(build_parser()))
    assert len(parsed) > 5, parsed
    listed = command_rows()
    assert sorted(parsed - listed) == [], "in the command line, missing from README's command table"
    assert sorted(listed - parsed) == [], "in README's command table, not a command"


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The application's routes (method, path) from its url_map, and those its served /openapi.json lists."""
    state = tmp_path_factory.mktemp("state")
    app = create_app(Settings.from_env({"ATTEST_NONCE_STORE": f"sqlite:///{state / 'nonces.sqlite3'}"}))
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules()
              # Flask's own static route: the package has no static folder, so it serves nothing.
              if rule.endpoint != "static"
              for method in (rule.methods or set()) - _IMPLICIT_METHODS}
    document = app.test_client().get("/openapi.json").get_json()
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    return routes, documented


def route_rows(text: str | None = None) -> set[tuple[str, str]]:
    """README's HTTP table: (method, path) of each row."""
    routes = set()
    for cells in table("HTTP API", text):
        match = re.fullmatch(r"`(GET|POST|PUT|PATCH|DELETE) (/\S*)`", cells[0])
        assert match is not None, f"not a route: {cells[0]!r}"
        routes.add((match.group(1), match.group(2)))
    return routes


def test_the_http_table_lists_every_route_and_no_other(
        app_routes: tuple[set[tuple[str, str]], set[tuple[str, str]]]) -> None:
    routes, _documented = app_routes
    assert len(routes) > 5, routes
    listed = route_rows()
    assert sorted(routes - listed) == [], "served, missing from README's HTTP table"
    assert sorted(listed - routes) == [], "in README's HTTP table, not served"


def test_the_openapi_document_lists_every_route_and_no_other(
        app_routes: tuple[set[tuple[str, str]], set[tuple[str, str]]]) -> None:
    routes, documented = app_routes
    assert sorted(routes - documented) == [], "served, missing from /openapi.json"
    assert sorted(documented - routes) == [], "in /openapi.json, not served"


def test_the_layout_table_names_every_module_and_package_of_the_service() -> None:
    text = README.read_text(encoding="utf-8")
    first_cells = " ".join(cells[0] for cells in table("Repository layout", text))
    entries = sorted(path.name for path in PACKAGE.iterdir()
                     if not path.name.startswith(".") and path.name not in ("__pycache__", "py.typed"))
    assert [name for name in entries if f"{name.removesuffix('.py')}" not in first_cells] == []


# The tables' readers fail on a table with a row removed: each test above would then pass on a table that
# lost one, which would make them worthless. Tried on README itself with one row taken out.

def _without_row(starting: str) -> str:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(starting)]
    assert len(kept) == len(lines) - 1, f"exactly one row starts with {starting!r}"
    return "".join(kept)


def test_a_variable_row_removed_is_missed() -> None:
    text = _without_row("| `ATTEST_BODY_TIMEOUT_SECONDS` |")
    assert "ATTEST_BODY_TIMEOUT_SECONDS" in variables_read() - set(configuration_rows(text))


def test_a_command_row_removed_is_missed() -> None:
    text = _without_row("| `attest-service certs crls fetch ")
    assert ("certs", "crls", "fetch") in set(_leaf_commands(build_parser())) - command_rows(text)


def test_a_route_row_removed_is_missed(app_routes: tuple[set[tuple[str, str]], set[tuple[str, str]]]) -> None:
    routes, _documented = app_routes
    text = _without_row("| `GET /.well-known/jwks.json` |")
    assert ("GET", "/.well-known/jwks.json") in routes - route_rows(text)


def chart_settings() -> dict[str, object]:
    """The chart's ``settings`` defaults by the variable each sets (``values.yaml`` names it in brackets)."""
    values = REPO_ROOT / "helm" / "attest-service" / "values.yaml"
    settings = yaml.safe_load(values.read_text(encoding="utf-8"))["settings"]
    by_variable: dict[str, object] = {}
    comment = ""
    lines = values.read_text(encoding="utf-8").split("\nsettings:\n", 1)[1].splitlines()
    for line in lines:
        if line and not line.startswith(" "):
            break
        if line.strip().startswith("#"):
            comment += line
        elif re.match(r"  [A-Za-z]+:", line):
            key = line.split(":", 1)[0].strip()
            named = re.findall(r"\[(ATTEST_[A-Z0-9_]+)\]", comment)
            assert len(named) == 1, f"values.yaml settings.{key} names no variable in brackets"
            by_variable[named[0]] = settings[key]
            comment = ""
    return by_variable


def _as_env(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def test_the_charts_settings_are_the_services_defaults() -> None:
    # The chart passes each settings value as its variable; as shipped, each must configure what the service
    # does with the variable unset, so that README's defaults hold for the chart too.
    by_variable = chart_settings()
    assert len(by_variable) >= 15, by_variable
    unset = Settings.from_env({})
    differing = {name: value for name, value in by_variable.items()
                 if value is not None and Settings.from_env({name: _as_env(value)}) != unset}
    assert differing == {}, "the chart's default differs from the service's"
