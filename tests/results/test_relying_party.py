"""The README's relying-party examples, run exactly as written against a running service.

Python: PyJWT (the test extra). Node: the ``jose`` package from npm, installed into a temporary folder; without
node or npm the Node test is skipped saying so, and fails under CI (tests/support/tools.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.service import REPO_ROOT, DocumentFactory, ServiceProcess, api_keys_env

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
KEY = "relying-party-example-key-0001"
#: The npm release line of jose the example is written for.
JOSE = "jose@6"


def example(marker: str) -> str:
    """The code block that follows ``<!-- marker -->`` in the README."""
    found = re.search(rf"<!-- {marker} -->\n```[a-z]+\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert found is not None, f"README has no {marker} example"
    return found.group(1)


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, str, str]]:
    """A running service (two workers, the embedded store's generated key), and one token it issued."""
    workdir = tmp_path_factory.mktemp("relying-party")
    factory = DocumentFactory.around_now(workdir / "pinned")
    env = {"ATTEST_PINNED_CERTS": str(factory.pinned_dir), "ATTEST_NONCE_STORE": f"sqlite:///{workdir / 'n.sqlite3'}",
           "ATTEST_API_KEYS": api_keys_env({"license-server": KEY})}
    service = ServiceProcess(env, workdir)
    service._env["ATTEST_RESULT_ISSUER"] = service.url
    with service:
        reply = service.post("/v1/verify", factory.verify_body("relying-party-1"), key=KEY)
        assert reply.status == 200, reply.body
        claims = reply.body["claims"]
        assert isinstance(claims, dict)
        yield service, str(reply.body["token"]), f"{claims['vmId']} affirming {claims['subscriptionId']}"


def _run(argv: list[str], cwd: Path) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_the_python_example_verifies_a_token(issued: tuple[ServiceProcess, str, str], tmp_path: Path) -> None:
    service, token, expected = issued
    script = tmp_path / "relying_party.py"
    script.write_text(example("relying-party-python"), encoding="utf-8")
    assert _run([sys.executable, str(script), service.url, token], tmp_path) == expected
    # A tampered token is refused by the example (PyJWT raises, the script exits non-zero).
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    refused = subprocess.run([sys.executable, str(script), service.url, tampered], capture_output=True, text=True,
                             timeout=120, check=False)
    assert refused.returncode != 0
    assert "InvalidSignatureError" in refused.stderr


@pytest.mark.requires_tool("node", "npm")
def test_the_node_example_verifies_a_token_with_the_jose_package(issued: tuple[ServiceProcess, str, str],
                                                                 tmp_path: Path) -> None:
    service, token, expected = issued
    _run(["npm", "install", "--no-audit", "--no-fund", "--silent", JOSE], tmp_path)
    script = tmp_path / "relying_party.mjs"
    script.write_text(example("relying-party-node"), encoding="utf-8")
    assert _run(["node", str(script), service.url, token], tmp_path) == expected
    header, payload, signature = token.split(".")
    refused = subprocess.run(["node", str(script), service.url, f"{header}.{payload}.{signature[:-4]}AAAA"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0
    assert "JWSSignatureVerificationFailed" in refused.stderr
