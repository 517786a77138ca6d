"""The master's snapshot: the pinned directory is loaded again when it changed, and only then.

In-process, on real files: :func:`attest_service.server.master.refresh` is what gunicorn's master runs before
each fork and every ``ATTEST_TRUST_RELOAD_SECONDS``. The respawn tests (test_respawn.py) show the same
snapshot reaching workers of a real gunicorn.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attest_service.errors import ConfigurationError
from attest_service.imds import pki
from attest_service.server import master

BROKEN_PEM = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"


@pytest.fixture(autouse=True)
def no_snapshot() -> Iterator[None]:
    """Each test starts as a master that has loaded nothing, and leaves none behind."""
    master.forget()
    yield
    master.forget()


@pytest.fixture
def pinned(tmp_path: Path) -> Path:
    root, issuing, _leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=datetime.now(UTC))
    directory = tmp_path / "pinned"
    pki.write_pinned_dir(directory, "public", root=root.certificate, intermediates=[issuing.certificate])
    return directory


@pytest.fixture
def listener() -> Iterator[list[socket.socket]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield [sock]
    sock.close()


def _env(pinned: Path) -> dict[str, str]:
    # The store is not opened here; the settings only need a valid URL.
    return {"ATTEST_PINNED_CERTS": str(pinned), "ATTEST_NONCE_STORE": f"sqlite:///{pinned.parent / 'n.db'}"}


def _another_issuing_ca() -> bytes:
    _root, issuing, _leaf = pki.generate_pki(cloud_domain="metadata.azure.com", now=datetime.now(UTC))
    return issuing.certificate.public_bytes(serialization.Encoding.PEM)


def _pinned_count(snapshot: master.Snapshot) -> int:
    return sum(1 for _ in snapshot.trust.all_pins())


def test_an_unchanged_directory_is_not_loaded_again(pinned: Path, listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    second = master.refresh(listener, _env(pinned))
    assert second.trust is first.trust
    assert second is not first  # the policy and the listening sockets are read again every time


def test_a_changed_directory_is_loaded(pinned: Path, listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    (pinned / "public" / "intermediates" / "issuing-b.pem").write_bytes(_another_issuing_ca())
    second = master.refresh(listener, _env(pinned))
    assert second.trust is not first.trust
    assert _pinned_count(second) == _pinned_count(first) + 1
    assert master.refresh(listener, _env(pinned)).trust is second.trust


def test_a_file_rewritten_in_place_is_loaded(pinned: Path, listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    [path] = (pinned / "public" / "intermediates").glob("*.pem")
    content = path.read_bytes()
    path.write_bytes(content)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert master.refresh(listener, _env(pinned)).trust is not first.trust


def test_another_directory_is_loaded_even_with_the_same_files(pinned: Path, tmp_path: Path,
                                                               listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    link = tmp_path / "same"
    link.symlink_to(pinned, target_is_directory=True)
    assert master.refresh(listener, _env(link)).trust is not first.trust


def test_a_broken_change_keeps_the_last_good_trust_and_is_tried_again(pinned: Path,
                                                                     listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    broken = pinned / "public" / "intermediates" / "broken.pem"
    broken.write_bytes(BROKEN_PEM)
    assert master.refresh(listener, _env(pinned)).trust is first.trust
    # Fixed, with a good CA added: loaded, with the new CA.
    broken.unlink()
    (pinned / "public" / "intermediates" / "issuing-b.pem").write_bytes(_another_issuing_ca())
    fixed = master.refresh(listener, _env(pinned))
    assert _pinned_count(fixed) == _pinned_count(first) + 1


def test_a_broken_directory_is_refused_when_nothing_loaded_before(pinned: Path,
                                                                  listener: list[socket.socket]) -> None:
    (pinned / "public" / "intermediates" / "broken.pem").write_bytes(BROKEN_PEM)
    with pytest.raises(ConfigurationError):
        master.refresh(listener, _env(pinned))


def test_a_vanished_directory_keeps_the_last_good_trust(pinned: Path, tmp_path: Path,
                                                       listener: list[socket.socket]) -> None:
    first = master.refresh(listener, _env(pinned))
    moved = tmp_path / "moved"
    pinned.rename(moved)
    assert master.refresh(listener, _env(pinned)).trust is first.trust
    moved.rename(pinned)
    # Back with the same files: the fingerprint is the one loaded, so nothing is loaded again.
    assert master.refresh(listener, _env(pinned)).trust is first.trust


def test_a_breakage_after_a_return_to_the_loaded_files_is_logged_again(pinned: Path, listener: list[socket.socket],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    master.refresh(listener, _env(pinned))
    broken = pinned / "public" / "intermediates" / "broken.pem"
    for _ in range(2):
        broken.write_bytes(BROKEN_PEM)
        master.refresh(listener, _env(pinned))
        broken.unlink()
        master.refresh(listener, _env(pinned))  # the files loaded last: nothing to load
    assert sum("is unusable" in record.getMessage() for record in caplog.records) == 2
