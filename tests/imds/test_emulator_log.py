"""The IMDS emulator's request lines in the service's log format (ATTEST_LOG_FORMAT), not Apache's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_line_of_the_emulator_is_json(tmp_path: Path) -> None:
    env = {**os.environ, "ATTEST_LOG_FORMAT": "json", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "attest_service", "imds-emulator", "--bind", "127.0.0.1:0",
                                "--pki-dir", str(tmp_path / "pki")], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        request = urllib.request.Request(f"{url}/metadata/versions", headers={"Metadata": "true"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records), lines
    assert any("GET /metadata/versions" in record["message"] for record in records), lines
