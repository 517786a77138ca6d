"""The pinned directory's fingerprint changes with everything the loader reads, and only then.

The workers (trust/reload.py) and the gunicorn master (server/master.py) skip a load when it is unchanged, so a
change it misses is a change of trust that never takes effect: a removed CA that stays trusted. Real files,
real symbolic links, the layout of a Kubernetes ConfigMap volume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from attest_service.errors import ConfigurationError
from attest_service.trust import load_trust
from attest_service.trust.loading import Fingerprint, directory_fingerprint


def _pins(directory: Path) -> int:
    return sum(1 for _ in load_trust(directory).all_pins())


def _one_pem(directory: Path) -> Path:
    return next((directory / "public" / "intermediates").glob("*.pem"))


def test_an_untouched_directory_keeps_its_fingerprint(pinned: Path) -> None:
    assert directory_fingerprint(pinned) == directory_fingerprint(pinned)


def _without_times(fingerprint: Fingerprint) -> list[tuple[object, ...]]:
    # Each entry is (name, type, size, device, inode, mtime, ctime, digest): the two times set aside.
    return [(*entry[:5], entry[7]) for entry in fingerprint]


def test_a_file_rewritten_with_its_size_and_modification_time_put_back_changes_it(pinned: Path) -> None:
    # On kernels before 6.13 the change time is coarse: a rewrite within one tick of the file's last change
    # leaves every time as it was, in production as here. The content is what must tell the rewrite apart.
    path = _one_pem(pinned)
    before = directory_fingerprint(pinned)
    info = path.stat()
    data = path.read_bytes()
    middle = len(data) // 2  # inside the base64 body: another certificate's bytes, the same size
    path.write_bytes(data[:middle] + (b"B" if data[middle:middle + 1] == b"A" else b"A") + data[middle + 1:])
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_mtime_ns == info.st_mtime_ns
    assert path.stat().st_size == info.st_size
    after = directory_fingerprint(pinned)
    assert after != before
    # With both times set aside, as the same tick would leave them, the rewrite still shows.
    assert _without_times(after) != _without_times(before)


def test_a_pin_removed_from_a_linked_directory_changes_it(pinned: Path, tmp_path: Path) -> None:
    # intermediates/ mounted from elsewhere through a symbolic link: the loader reads through it.
    outside = tmp_path / "elsewhere"
    shutil.move(pinned / "public" / "intermediates", outside)
    (pinned / "public" / "intermediates").symlink_to(outside, target_is_directory=True)
    before, pins = directory_fingerprint(pinned), _pins(pinned)
    next(outside.glob("*.pem")).unlink()
    assert _pins(pinned) == pins - 1
    assert directory_fingerprint(pinned) != before


def test_the_configmap_swap_changes_it_and_the_same_content_keeps_it(pinned: Path, tmp_path: Path) -> None:
    # kubelet's layout: a timestamped directory, ..data pointing at it, each top entry pointing into ..data.
    volume = tmp_path / "volume"
    volume.mkdir()
    shutil.copytree(pinned, volume / "..2026_12_01_1")
    (volume / "..data").symlink_to("..2026_12_01_1")
    for entry in sorted((volume / "..data").iterdir()):
        (volume / entry.name).symlink_to(f"..data/{entry.name}")
    first = directory_fingerprint(volume)
    assert directory_fingerprint(volume) == first
    shutil.copytree(volume / "..2026_12_01_1", volume / "..2026_12_01_2")
    next((volume / "..2026_12_01_2" / "public" / "intermediates").glob("*.pem")).unlink()
    (volume / "..data_tmp").symlink_to("..2026_12_01_2")
    (volume / "..data_tmp").rename(volume / "..data")
    shutil.rmtree(volume / "..2026_12_01_1")
    assert directory_fingerprint(volume) != first


def test_a_folder_retargeted_outside_the_tree_changes_it(pinned: Path, tmp_path: Path) -> None:
    # intermediates/ links to a "current" link outside the tree, which is swapped from one copy of the pins
    # to another with one pin fewer: only the folder the path resolves to tells the two apart.
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(pinned / "public" / "intermediates", first)
    shutil.copytree(pinned / "public" / "intermediates", second)
    next(second.glob("*.pem")).unlink()
    shutil.rmtree(pinned / "public" / "intermediates")
    current = tmp_path / "current"
    current.symlink_to(first, target_is_directory=True)
    (pinned / "public" / "intermediates").symlink_to(current, target_is_directory=True)
    before, pins = directory_fingerprint(pinned), _pins(pinned)
    (tmp_path / "next").symlink_to(second, target_is_directory=True)
    (tmp_path / "next").rename(current)
    assert _pins(pinned) == pins - 1
    assert directory_fingerprint(pinned) != before


def test_a_new_folder_or_fifo_among_the_pins_changes_it(pinned: Path) -> None:
    before = directory_fingerprint(pinned)
    (pinned / "public" / "roots" / "nested").mkdir()
    assert directory_fingerprint(pinned) != before
    before = directory_fingerprint(pinned)
    os.mkfifo(pinned / "public" / "intermediates" / "pipe.pem")
    assert directory_fingerprint(pinned) != before


def test_what_the_loader_does_not_read_is_not_looked_at(pinned: Path, tmp_path: Path) -> None:
    before = directory_fingerprint(pinned)
    # A link to a huge tree beside the pins, a loop, hidden editor files (a dangling lock link among them):
    # none of it is read by the loader, none of it may fail or change the check.
    (pinned / "usr").symlink_to("/usr", target_is_directory=True)
    (pinned / "public" / "loop").symlink_to("..", target_is_directory=True)
    (pinned / "public" / "intermediates" / ".#removed.txt").symlink_to("root@host.1234")
    (pinned / "public" / "intermediates" / ".swap").write_bytes(b"x")
    assert directory_fingerprint(pinned) == before
    assert _pins(pinned) > 0


def test_a_dangling_link_among_the_pins_is_recorded_not_raised(pinned: Path) -> None:
    link = pinned / "public" / "intermediates" / "next.pem"
    link.symlink_to("absent.pem")
    dangling = directory_fingerprint(pinned)
    real = next(path for path in (pinned / "public" / "intermediates").glob("*.pem") if not path.is_symlink())
    shutil.copy(real, pinned / "public" / "intermediates" / "absent.pem")
    assert directory_fingerprint(pinned) != dangling


def test_an_empty_directory_has_a_fingerprint_that_is_not_empty(tmp_path: Path) -> None:
    # The reload uses () for "matches no directory": no real directory may fingerprint to it.
    (tmp_path / "empty").mkdir()
    assert directory_fingerprint(tmp_path / "empty") != ()


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        directory_fingerprint(tmp_path / "absent")


def test_a_pin_that_cannot_be_read_fails_the_check_and_the_load_alike(pinned: Path) -> None:
    # A link to itself: neither may escape as an OSError (the master would stop, a worker would fail every
    # request); both refuse with a ConfigurationError, which keeps the last good trust.
    (pinned / "public" / "intermediates" / "self.pem").symlink_to("self.pem")
    with pytest.raises(ConfigurationError, match="cannot read"):
        directory_fingerprint(pinned)
    with pytest.raises(ConfigurationError):
        load_trust(pinned)


def test_a_fifo_under_a_pin_name_is_refused_without_waiting(pinned: Path) -> None:
    # Opening a FIFO with no writer blocks; the loader must refuse it at once (the test's timeout guards).
    os.mkfifo(pinned / "public" / "intermediates" / "pipe.pem")
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_trust(pinned)
