"""The files that record the pins: ``manifest.json`` (each pin's provenance) and the fingerprint lists.

``intermediates/fingerprints.txt`` pins CAs by fingerprint; ``intermediates/removed.txt`` names the CAs
removed with ``certs remove``. Both are rewritten line by line, comments kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from attest_service.errors import ConfigurationError
from attest_service.trust.loading import (
    CERTIFI_LIST,
    FINGERPRINT_LIST,
    MANIFEST,
    manifest_entry,
    normalise_digest,
)
from attest_service.trust.pins.atomic import atomic_write
from attest_service.verify import (
    FingerprintPin,
    PinnedCertificate,
    TrustStore,
)

#: Key of a manifest entry that marks its pin retired; its value says why the pin is kept.
RETIRED_KEY: Final = "retired"


def manifest_key(entry: dict[str, str]) -> tuple[str, str, str, str]:
    """The identity of a certificate entry of the manifest: cloud, role, file and SHA-256."""
    return (entry.get("cloud", ""), entry.get("role", ""), entry.get("file", ""), entry.get("sha256", ""))


#: Key of ``manifest.json`` listing the fingerprint pins (cloud, file, algorithm, digest, url, name, source).
FINGERPRINTS_KEY: Final = "fingerprints"


def read_manifest_document(directory: Path) -> dict[str, list[dict[str, str]]] | None:
    """Both lists of ``manifest.json`` (certificates and fingerprints), or None when there is no manifest."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path}: expected a JSON object")
    lists: dict[str, list[dict[str, str]]] = {}
    for key in ("certificates", FINGERPRINTS_KEY):
        entries = document.get(key, [] if key == FINGERPRINTS_KEY else None)
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(v, str) for v in e.values()) for e in entries):
            raise ConfigurationError(f"{path}: expected {{\"{key}\": [{{...}}, ...]}} with string fields")
        lists[key] = entries
    return lists


def read_manifest(directory: Path) -> list[dict[str, str]] | None:
    """The certificate entries of ``manifest.json``, or None when the directory has none.

    Raises ConfigurationError when the file exists but is not a manifest.
    """
    document = read_manifest_document(directory)
    return None if document is None else document["certificates"]


def read_fingerprint_manifest(directory: Path) -> list[dict[str, str]] | None:
    """The fingerprint pin entries of ``manifest.json`` (``fingerprints``), or None without a manifest."""
    document = read_manifest_document(directory)
    return None if document is None else document[FINGERPRINTS_KEY]


def fingerprint_manifest_entry(pin: FingerprintPin, source: str) -> dict[str, str]:
    """The manifest record of one fingerprint pin: where its fingerprint and URL were taken from."""
    return {"cloud": pin.cloud, "file": f"{pin.cloud}/intermediates/{FINGERPRINT_LIST}", "algorithm": pin.algorithm,
            "digest": pin.digest, "url": pin.url or "-", "name": pin.name, "source": source}


def fingerprint_entry_key(entry: dict[str, str]) -> tuple[str, str, str]:
    """The identity of a fingerprint entry of the manifest: cloud, digest and URL."""
    return (entry.get("cloud", ""), entry.get("digest", ""), entry.get("url", ""))


def pin_file(pin: PinnedCertificate) -> str:
    """The file a pin was read from, relative to the pinned directory, as the manifest names it."""
    if pin.source == "certifi":
        return f"{pin.cloud}/roots/{CERTIFI_LIST}"
    return pin.source.removeprefix("file:")


def retired_marks(directory: Path | None) -> dict[tuple[str, str], str]:
    """``(cloud, sha256) -> why it is kept`` of the pins the manifest of ``directory`` marks retired.

    A directory without a readable manifest marks nothing (the manifest problem is reported on its own).
    """
    if directory is None:
        return {}
    try:
        entries = read_manifest(directory) or []
    except ConfigurationError:
        return {}
    return {(e.get("cloud", ""), e.get("sha256", "")): e[RETIRED_KEY]
            for e in entries if e.get(RETIRED_KEY, "").strip()}


def write_manifest(trust: TrustStore, directory: Path, *, add: Iterable[dict[str, str]] = (),
                    drop: Iterable[tuple[str, str, str, str]] = (),
                    add_fingerprints: Iterable[dict[str, str]] = (),
                    drop_fingerprints: Iterable[tuple[str, str, str]] = ()) -> None:
    """Rewrite ``manifest.json`` with the entries ``add`` and without those ``drop`` names (by their keys)."""
    document = read_manifest_document(directory)
    if document is None:
        # First change to a directory without a manifest: record what is already there, saying honestly
        # that its origin is unknown, so that the manifest describes every pin from now on.
        unrecorded = "unrecorded (pinned before the manifest existed)"
        document = {"certificates": [manifest_entry(pin, unrecorded) | {"file": pin_file(pin)}
                                     for pin in trust.all_pins()],
                    FINGERPRINTS_KEY: [fingerprint_manifest_entry(pin, unrecorded) for cloud in trust.clouds.values()
                                       for pin in cloud.fingerprint_pins]}
    dropped = set(drop)
    dropped_fingerprints = set(drop_fingerprints)
    updated: dict[str, object] = {
        "certificates": [*(e for e in document["certificates"] if manifest_key(e) not in dropped), *add]}
    fingerprints = [*(e for e in document[FINGERPRINTS_KEY] if fingerprint_entry_key(e) not in dropped_fingerprints),
                    *add_fingerprints]
    if fingerprints:
        updated[FINGERPRINTS_KEY] = fingerprints
    atomic_write(directory / MANIFEST, (json.dumps(updated, indent=1, ensure_ascii=False) + "\n").encode())


def rewrite_list(path: Path, *, keep: Callable[[str], bool] = lambda _digest: True,
                  append: Sequence[str] = (), header: str = "") -> None:
    """Rewrite a fingerprint list file without the lines whose digest ``keep`` rejects, plus ``append``.

    Comments and blank lines stay as they are; a file left with no entry and no comment is deleted.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else ([header] if header else [])
    kept = []
    for line in lines:
        text = line.partition("#")[0].strip()
        parsed = normalise_digest(text.split()[0]) if text else None
        if parsed is None or keep(parsed[1]):
            kept.append(line)
    kept.extend(append)
    if any(line.partition("#")[0].strip() for line in kept):
        atomic_write(path, ("\n".join(kept) + "\n").encode())
    elif path.is_file():
        path.unlink()
