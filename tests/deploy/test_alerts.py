"""The shipped alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .common import CHART_DIR

RULES_FILE = CHART_DIR / "files" / "alerts.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
#: The alerts the chart ships, in the order of the rules file.
ALERTS = ("AttestUnpinnedIssuer", "AttestPinExpiringSoon", "AttestTrustReloadFailing", "AttestStoreUnavailable",
          "AttestVerificationFailureRatio")
#: promtool checks and unit-tests these rules in well under a second; this only stops a hung process.
PROMTOOL_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="session")
def promtool() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real promtool (Debian's prometheus package, which `make test` installs when it is missing).

    Missing promtool fails the test under CI=true: a green CI must mean the rules were tested. Elsewhere the
    test is skipped with the reason, so that a developer without the package can run the rest.
    """
    binary = shutil.which("promtool")
    if binary is None:
        message = "promtool not found: `make test` installs it (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *map(str, args)], capture_output=True, text=True,
                              timeout=PROMTOOL_TIMEOUT_SECONDS, check=False)

    return run


def passed(result: subprocess.CompletedProcess[str]) -> str:
    """promtool's output, after asserting that it exited 0."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


# --- promtool on the rules file -----------------------------------------------------------------------------


def test_rules_file_passes_promtool_check(promtool: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    output = passed(promtool("check", "rules", RULES_FILE))
    assert f"SUCCESS: {len(ALERTS)} rules found" in output


def test_unit_tests_pass_on_the_rules_file(promtool: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    output = passed(promtool("test", "rules", UNIT_TESTS))
    assert "SUCCESS" in output


def test_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    """At least one evaluation expects each alert to fire, and one expects it to stay quiet."""
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))
    assert unit_tests["rule_files"] == [os.path.relpath(RULES_FILE, UNIT_TESTS.parent)]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in unit_tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == quiet == set(ALERTS)
