"""What the command line tells a person: help that describes every command and argument, usage errors that
say what is wrong, and the same shapes and codes as the service."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from attest_service.cli import build_parser, main
from attest_service.web.errors import STATUS_BY_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", [("certs", "check"), ("certs", "explain"), ("certs", "remove"), ("verify",),
                                  ("api-key", "new")])
def test_the_command_has_a_description_and_every_argument_its_help(path: tuple[str, ...]) -> None:
    parser = _subparser(build_parser(), *path)
    assert parser.description, path
    assert len(parser.description) > 40, path
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{' '.join(path)} {action.option_strings or action.dest} has no help"


def test_verify_help_lists_its_exit_codes() -> None:
    text = _subparser(build_parser(), "verify").format_help()
    assert re.search(r"0 verified, 1 refused .*2 usage error", " ".join(text.split()))


@pytest.mark.parametrize("url", ["127.0.0.1:8090", "localhost:8080", "ftp://127.0.0.1", "http://", "http://h:99999"])
@pytest.mark.parametrize("option", ["--service", "--imds-url"])
def test_attest_without_an_http_url_is_a_usage_error(option: str, url: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["attest", "--service", "http://127.0.0.1:9", option, url])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert f"argument {option}: {url!r} is not an http:// or https:// URL" in captured.err
    assert captured.out == ""


def test_readme_code_table_lists_every_code_the_service_answers() -> None:
    # /openapi.json's error enum is STATUS_BY_CODE (tests/web/test_openapi.py holds it so); README's table
    # must give each code with its status, and no other.
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("Errors are `{\"verified\": false, \"error\": {\"code\", \"message\"}}`:", 1)[1]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", table.split("\n\n", 2)[1], re.MULTILINE))
    assert {code: int(status) for code, status in rows.items()} == dict(STATUS_BY_CODE)
