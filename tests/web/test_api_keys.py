"""API keys: minted by ``attest-service api-key new``, several per client, rotated without downtime.

The keys are minted by the real command and checked by the real application: the entry it prints is what
``ATTEST_API_KEYS`` takes, and the key it prints is what a client sends.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from attest_service.cli import main
from attest_service.errors import ConfigurationError
from attest_service.settings import parse_api_keys

from .conftest import AppFactory


def mint(client_id: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """A key and its entry from ``attest-service api-key new CLIENT_ID --json``."""
    assert main(["api-key", "new", client_id, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["client_id"] == client_id
    return printed["key"], printed["entry"]


def test_a_minted_key_is_256_random_bits_and_its_entry_is_its_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    key, entry = mint("vendor-a", capsys)
    assert len(base64.urlsafe_b64decode(key + "=")) == 32
    assert entry == f"vendor-a:{hashlib.sha256(key.encode()).hexdigest()}"
    assert parse_api_keys(entry) == {"vendor-a": (hashlib.sha256(key.encode()).digest(),)}
    assert mint("vendor-a", capsys)[0] != key


def test_the_plain_output_is_two_labelled_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["api-key", "new", "vendor-a"]) == 0
    key_line, entry_line = capsys.readouterr().out.splitlines()
    key = key_line.removeprefix("key:").strip()
    assert entry_line.removeprefix("entry:").strip() == f"vendor-a:{hashlib.sha256(key.encode()).hexdigest()}"


@pytest.mark.parametrize("client_id", ["bad id", "_leading-underscore", "x" * 65, "vendor:a"])
def test_a_client_id_the_variable_refuses_is_a_usage_error(client_id: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["api-key", "new", client_id]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "is not a client id" in captured.err


def test_rotation_add_the_new_key_move_the_client_remove_the_old(make_client: AppFactory,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old_key, old_entry = mint("vendor-a", capsys)
    new_key, new_entry = mint("vendor-a", capsys)
    _, other_entry = mint("vendor-b", capsys)

    def status(client_env: str, key: str) -> int:
        client = make_client(ATTEST_API_KEYS=client_env)
        return client.post("/v1/challenges", headers={"Authorization": f"Bearer {key}"}).status_code

    # 1. Both keys of one client are valid at once, beside another client's.
    both = f"{old_entry},{other_entry},{new_entry}"
    assert (status(both, old_key), status(both, new_key)) == (201, 201)
    # 2. Once the client sends the new key, the old entry goes; the old key is refused.
    assert (status(f"{other_entry},{new_entry}", old_key), status(f"{other_entry},{new_entry}", new_key)) == (401, 201)


def test_one_key_twice_or_for_two_clients_is_refused() -> None:
    digest = hashlib.sha256(b"k").hexdigest()
    with pytest.raises(ConfigurationError, match="listed twice"):
        parse_api_keys(f"vendor-a:{digest},vendor-a:{digest.upper()}")
    with pytest.raises(ConfigurationError, match="for both 'vendor-a' and 'vendor-b'"):
        parse_api_keys(f"vendor-a:{digest},vendor-b:{digest}")


@pytest.mark.parametrize("client_id", ["anonymous", "Anonymous"])
def test_the_audience_of_keyless_callers_is_no_clients_id(client_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A relying party of a client named "anonymous" checks aud == "anonymous", which every result of a caller
    # without a key carries: it would accept results that the client's own allow-lists refused.
    digest = hashlib.sha256(b"k").hexdigest()
    with pytest.raises(ConfigurationError, match="is reserved"):
        parse_api_keys(f"vendor-a:{hashlib.sha256(b'a').hexdigest()},{client_id}:{digest}")
    assert main(["api-key", "new", client_id]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "is reserved" in captured.err
