"""The VM-side client's messages: a network failure said in words, not as urllib prints it."""

from __future__ import annotations

import socket
import ssl
import urllib.error
from pathlib import Path

import pytest

from attest_service.cli import main
from attest_service.imds.client import network_reason


@pytest.mark.parametrize(("error", "sentence"), [
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
     "the connection was refused (nothing listens there: is the address and port right?)"),
    (urllib.error.URLError(TimeoutError("timed out")), "no answer in time"),
    (TimeoutError("timed out"), "no answer in time"),
    (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "the host name does not resolve"),
    (urllib.error.URLError(ssl.SSLCertVerificationError(1, "certificate verify failed")),
     "its TLS certificate is not trusted by this machine"),
    (ConnectionResetError(104, "Connection reset by peer"), "the connection was closed or reset"),
    (urllib.error.URLError(OSError(113, "No route to host")), "no route to host"),
    (urllib.error.URLError("unknown url type: x"), "a network error"),
])
def test_a_network_failure_is_said_in_words(error: BaseException, sentence: str) -> None:
    assert network_reason(error) == sentence


def test_attest_to_a_closed_port_says_the_connection_was_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1 of loopback: the service is unreachable, exit 4, in a sentence.
    assert main(["attest", "--service", "http://127.0.0.1:1", "--imds-url", "http://127.0.0.1:1"]) == 4
    err = capsys.readouterr().err
    assert "cannot reach the service at http://127.0.0.1:1/v1/challenges: the connection was refused" in err
    assert "urlopen" not in err
    assert "Errno" not in err


def test_an_unreadable_key_file_is_said_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.key"
    assert main(["attest", "--service", "http://127.0.0.1:1", "--api-key-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--api-key-file {missing}: cannot read the key: no such file or directory" in err
    assert "Errno" not in err

