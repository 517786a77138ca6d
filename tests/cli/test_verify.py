"""``attest-service verify`` end to end, as a separate process: exit codes and one JSON object on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Every test runs the command line as a process.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTCASES = REPO_ROOT / "tests" / "assets" / "testcases"
PINNED = TESTCASES / "pinned"
INDEX: dict[str, dict[str, Any]] = json.loads((TESTCASES / "index.json").read_text(encoding="utf-8"))["cases"]
BASE = INDEX["ok-rsa"]
AT = BASE["at"]
BASE_FILE = TESTCASES / BASE["file"]
BARE_FILE = TESTCASES / INDEX["ok-bare-base64"]["file"]

#: Seconds one command may take; start-up plus one verification is well under a second.
COMMAND_TIMEOUT = 60


def run(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m attest_service verify ARGS``; return exit code, stdout and stderr."""
    environment = {key: value for key, value in os.environ.items() if key != "ATTEST_PINNED_CERTS"}
    environment.update(env or {})
    completed = subprocess.run([sys.executable, "-m", "attest_service", "verify", *args], input=stdin,
                               capture_output=True, cwd=REPO_ROOT, env=environment, timeout=COMMAND_TIMEOUT,
                               check=False)
    stdout, stderr = completed.stdout.decode(), completed.stderr.decode()
    assert "Traceback" not in stderr
    return completed.returncode, stdout, stderr


def one_json_object(stdout: str) -> dict[str, Any]:
    """Parse stdout, which must be exactly one JSON object on one line."""
    assert stdout.endswith("\n")
    assert stdout.count("\n") == 1
    payload = json.loads(stdout)
    assert isinstance(payload, dict)
    return payload


def verified(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> dict[str, Any]:
    code, stdout, _ = run(*args, stdin=stdin, env=env)
    payload = one_json_object(stdout)
    assert code == 0, payload
    assert payload["verified"] is True
    assert payload["claims"] == BASE["claims"]
    assert payload["cloud"] == "public"
    assert payload["signer"]["sha256"] == BASE["signer_sha256"]
    return payload


def refused(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> str:
    code, stdout, _ = run(*args, stdin=stdin, env=env)
    payload = one_json_object(stdout)
    assert code == 1, payload
    assert payload["verified"] is False
    assert set(payload["error"]) == {"code", "message"}
    assert payload["error"]["message"]
    code_name: str = payload["error"]["code"]
    return code_name


def usage_error(*args: str, stdin: bytes = b"") -> str:
    code, stdout, stderr = run(*args, stdin=stdin)
    assert code == 2
    assert stdout == ""
    assert stderr.strip()
    return stderr


def test_valid_response_file() -> None:
    payload = verified("--pinned-certs", str(PINNED), "--at", AT, str(BASE_FILE))
    # The same nonce object as the service's answer.
    assert payload["nonce"] == {"value": BASE["claims"]["nonce"], "checked": False, "challenge": False}
    assert payload["signer"]["dnsNames"] == ["eastus.metadata.azure.com", "metadata.azure.com"]
    assert len(payload["signer"]["chain"]) == 3


def test_valid_with_matching_nonce_and_explicit_cloud() -> None:
    payload = verified("--pinned-certs", str(PINNED), "--at", AT, "--cloud", "public",
                       "--nonce", BASE["claims"]["nonce"], str(BASE_FILE))
    assert payload["nonce"] == {"value": BASE["claims"]["nonce"], "checked": True, "challenge": False}


def test_bare_base64_on_stdin_dash() -> None:
    verified("--pinned-certs", str(PINNED), "--at", AT, "-", stdin=BARE_FILE.read_bytes())


def test_response_on_stdin_without_file_argument_and_trust_from_environment() -> None:
    verified("--at", AT, stdin=BASE_FILE.read_bytes(), env={"ATTEST_PINNED_CERTS": str(PINNED)})


#: The base document is valid from createdOn 12:00:00Z to expiresOn 18:00:00Z, with 60 s of allowed skew: the
#: first and last instants it verifies at, and one second outside each.
FIRST, LAST = "2025-06-01T11:59:00", "2025-06-01T18:01:00"
BEFORE, AFTER = "2025-06-01T11:58:59", "2025-06-01T18:01:01"
#: Local zones on both sides of UTC (POSIX TZ strings: the sign is the offset west of Greenwich).
ZONES = ("BRT3", "JST-9")


@pytest.mark.parametrize("zone", ZONES)
def test_at_with_offset_and_without_one(zone: str) -> None:
    # At the window's edges an offset that is ignored or taken with the wrong sign moves the instant out of the
    # window (by two hours either way), and an instant without offset read in the local zone (3 h west or 9 h
    # east here) does too: each is verified only when it is read exactly.
    env = {"TZ": zone}
    pinned = ("--pinned-certs", str(PINNED))
    verified(*pinned, "--at", "2025-06-01T20:01:00+02:00", str(BASE_FILE), env=env)  # LAST
    verified(*pinned, "--at", "2025-06-01T09:59:00-02:00", str(BASE_FILE), env=env)  # FIRST
    assert refused(*pinned, "--at", "2025-06-01T20:01:01+02:00", str(BASE_FILE), env=env) == "document_expired"
    assert refused(*pinned, "--at", "2025-06-01T09:58:59-02:00", str(BASE_FILE), env=env) == "document_not_yet_valid"
    # Without an offset the instant is UTC whatever the local zone.
    verified(*pinned, "--at", LAST, str(BASE_FILE), env=env)
    verified(*pinned, "--at", FIRST, str(BASE_FILE), env=env)
    assert refused(*pinned, "--at", AFTER, str(BASE_FILE), env=env) == "document_expired"
    assert refused(*pinned, "--at", BEFORE, str(BASE_FILE), env=env) == "document_not_yet_valid"


def test_nonce_mismatch() -> None:
    assert refused("--pinned-certs", str(PINNED), "--at", AT, "--nonce", "other", str(BASE_FILE)) == "nonce_mismatch"


def test_wrong_cloud() -> None:
    assert refused("--pinned-certs", str(PINNED), "--at", AT, "--cloud", "usgov", str(BASE_FILE)) == "subject_mismatch"


@pytest.mark.parametrize("name", ["attack-lookalike-chain", "input-encoding-base64", "revoked-leaf"])
def test_refused_case(name: str) -> None:
    case = INDEX[name]
    assert refused("--pinned-certs", str(PINNED), "--at", case["at"], str(TESTCASES / case["file"])) == case["expect"]


def test_bundled_pins_do_not_trust_the_test_pki() -> None:
    assert refused("--at", AT, str(BASE_FILE)) == "untrusted_chain"


# The core's own tests cover junk exhaustively; these check that the command reports it as one JSON object.
@pytest.mark.parametrize("data", [b"", b"\xff\xfe\x00garbage", b"[1, 2]", b"A" * 300_000])
def test_junk_input_is_refused_as_json(data: bytes) -> None:
    assert refused("--pinned-certs", str(PINNED), "--at", AT, stdin=data) == "malformed_document"


def test_usage_bad_at() -> None:
    assert "--at" in usage_error("--pinned-certs", str(PINNED), "--at", "yesterday", str(BASE_FILE))


def test_usage_bad_cloud() -> None:
    assert "--cloud" in usage_error("--pinned-certs", str(PINNED), "--cloud", "mars", str(BASE_FILE))


def test_usage_unreadable_file(tmp_path: Path) -> None:
    assert "cannot read" in usage_error("--pinned-certs", str(PINNED), str(tmp_path / "absent.json"))
    assert "cannot read" in usage_error("--pinned-certs", str(PINNED), str(tmp_path))


def test_usage_missing_pinned_directory(tmp_path: Path) -> None:
    usage_error("--pinned-certs", str(tmp_path / "absent"), str(BASE_FILE))


@pytest.mark.parametrize("argv", [["certs", "list"], ["verify", "--at", "2025-06-01T12:01:00Z", "-"]],
                         ids=lambda argv: argv[0])
def test_a_closed_standard_output_ends_the_command_without_a_traceback(argv: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes its first byte
    try:
        result = subprocess.run([sys.executable, "-m", "attest_service", *argv], stdout=write_end,
                                stderr=subprocess.PIPE, input=b"not a document", cwd=REPO_ROOT, timeout=60,
                                check=False)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, b"")
