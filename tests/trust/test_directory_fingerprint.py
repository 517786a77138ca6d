"""The pinned directory's fingerprint changes with everything the loader reads, and only then.

The workers (trust/reload.py) and the gunicorn master (web/master.py) skip a load when it is unchanged, so a
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
from attest_service.trust.loading import directory_fingerprint


def _pins(directory: Path) -> int:
    return sum(1 for _ in load_trust(directory).all_pins())


def _one_pem(directory: Path) -> Path:
    return next((directory / "public" / "intermediates").glob("*.pem"))


def test_an_untouched_directory_keeps_its_fingerprint(pinned: Path) -> None:
    assert directory_fingerprint(pinned) == directory_fingerprint(pinned)


def test_a_file_rewritten_with_its_size_and_modification_time_put_back_changes_it(pinned: Path) -> None:
    path = _one_pem(pinned)
    before = directory_fingerprint(pinned)
    info = path.stat()
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_mtime_ns == info.st_mtime_ns
    assert directory_fingerprint(pinned) != before  # the change time moved


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


def test_a_link_back_up_the_tree_is_walked_once(pinned: Path) -> None:
    (pinned / "public" / "loop").symlink_to("..", target_is_directory=True)
    fingerprint = directory_fingerprint(pinned)
    assert sum(1 for name, *_ in fingerprint if name.startswith("public/loop")) == 1  # the link itself


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        directory_fingerprint(tmp_path / "absent")
