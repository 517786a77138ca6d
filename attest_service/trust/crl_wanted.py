"""The CRL URLs of signers the service verified without a current CRL, for the background fetch to get.

No pinned certificate names the CRL of an issuing CA: only the leaves it signed do (Azure's Microsoft TLS G2
CAs even partition their CRLs, each leaf naming its partition). So when the CRLs are fetched beside the
service (``ATTEST_CRL_REFRESH_SECONDS``), a worker that accepts a document although no current CRL covered
its path notes the cRLDistributionPoints of its signer in ``<cloud>/crls/wanted.txt``, where the next round of
``certs crls fetch`` (:func:`~attest_service.trust.crl_fetch.wanted_crls`) finds them.

Only signers of documents that verified are noted (their signature, name and path to a pinned root checked),
so a forger cannot make the fetch ask for anything; the fetch still takes only allow-listed URLs. Each worker
notes a signer once (:data:`MAX_SIGNERS` remembered) and appends a line only for a URL not in the file yet, in
one ``O_APPEND`` write per line under an exclusive ``flock``, so workers writing at once neither interleave nor
both pass the checks (a lock held by anyone for longer than :data:`LOCK_WAIT_SECONDS` skips the note rather
than stall the worker). The file never grows past :data:`MAX_WANTED_BYTES`, the most that is read back: a line
that would take it further is not written (logged once per process), since a file too large to read would
be neither deduplicated against nor fetched from. A directory that cannot be written (a read-only mount) is
logged once and otherwise changes nothing: the verification never depends on it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509

from attest_service.errors import AttestError, ConfigurationError
from attest_service.files import read_bounded
from attest_service.trust.crls import CRL_FOLDER, WANTED_LIST
from attest_service.verify import VerifiedDocument, signer_certificate

LOG: Final = logging.getLogger(__name__)
#: Largest wanted list read, in bytes; the service never writes it past this.
MAX_WANTED_BYTES: Final = 1024 * 1024
#: Signers a worker remembers having noted; beyond it the set starts afresh (the file dedupes too).
MAX_SIGNERS: Final = 256
#: Longest wait for the list's lock (workers hold it only to check and append a line); past it, no note.
LOCK_WAIT_SECONDS: Final = 0.5
#: Pause between two tries of the lock.
LOCK_POLL_SECONDS: Final = 0.01

_directory: Path | None = None
_noted: set[str] = set()
_lock = threading.Lock()
_failed = False
_full_logged = False


def enable(directory: Path | None) -> None:
    """Note wanted CRLs in ``directory`` from now on (None: stop); the service does when the fetch runs beside it."""
    global _directory, _full_logged  # noqa: PLW0603 - one trust directory per process
    with _lock:
        _directory = directory
        _noted.clear()
        _full_logged = False


def read_wanted(folder: Path) -> list[tuple[str, ...]]:
    """The lines of ``folder/wanted.txt``: each a signer's CRL URLs (alternatives), in order; empty when unreadable."""
    try:
        text = read_bounded(folder / WANTED_LIST, MAX_WANTED_BYTES, what="wanted CRLs").decode("utf-8", "replace")
    except ConfigurationError:
        return []
    lines = (tuple(url for url in line.split("#", 1)[0].split() if url.startswith(("http://", "https://")))
             for line in text.splitlines())
    return list(dict.fromkeys(urls for urls in lines if urls))


def note(document: bytes, result: VerifiedDocument) -> None:
    """After ``result`` was accepted without a current CRL for its path: note its signer's CRL URLs.

    Does nothing unless :func:`enable` was called, when the path was covered, or for a signer noted before.
    Never raises.
    """
    global _failed  # noqa: PLW0603 - logged once per process
    directory = _directory
    if directory is None or not result.revocation_unknown:
        return
    with _lock:
        if result.signer.sha256 in _noted:
            return
        if len(_noted) >= MAX_SIGNERS:
            _noted.clear()
        _noted.add(result.signer.sha256)
    try:
        signer = signer_certificate(document)
        points = signer.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        urls = [name.value for point in points for name in (point.full_name or ())
                if isinstance(name, x509.UniformResourceIdentifier)]
    except (AttestError, x509.ExtensionNotFound, ValueError, TypeError):
        return  # no usable cRLDistributionPoints: nothing to fetch for it
    urls = [url for url in urls if url.startswith(("http://", "https://")) and not any(c.isspace() for c in url)]
    folder = directory / result.cloud / CRL_FOLDER
    if not urls:
        return
    when = datetime.now(UTC).replace(microsecond=0).isoformat()
    # The signer's URLs are alternatives for one CRL: one line, so that the fetch downloads it once.
    line = f"{' '.join(urls)}  # CRL of {result.signer.issuer[:200]}, wanted {when}\n".encode()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_NONBLOCK: a FIFO under the list's name must not hold the worker (it changes nothing for a file).
        # O_NOFOLLOW: a symbolic link there must not have the service append to the file it names.
        descriptor = os.open(folder / WANTED_LIST, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                             | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
        try:
            # Another worker's check-then-append must not run between ours: the dedupe and the cap hold.
            _lock_briefly(descriptor)
            if any(set(urls) & set(noted) for noted in read_wanted(folder)):
                return
            size = os.fstat(descriptor).st_size
            if size + len(line) > MAX_WANTED_BYTES:
                _log_full(folder, size)
                return
            os.write(descriptor, line)
        finally:
            os.close(descriptor)  # releases the lock
    except OSError as exc:
        if not _failed:
            _failed = True
            LOG.warning("cannot note the CRL URLs of verified signers in %s (%s): the background CRL fetch gets "
                        "only the CRLs the pins name", folder, exc.strerror)


def _lock_briefly(descriptor: int) -> None:
    """Take the list's exclusive lock, waiting at most :data:`LOCK_WAIT_SECONDS`; raise OSError if it stays held.

    Workers hold it only to check and append one line. The list is world-readable, and any descriptor of it
    can hold the lock: a blocking wait would let whoever holds it stall every worker that notes a signer (the
    whole gevent worker, flock being a blocking call), so the note is skipped instead. The sleep yields under
    gevent.
    """
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(LOCK_POLL_SECONDS)
        else:
            return


def _log_full(folder: Path, size: int) -> None:
    """Say once per process that the wanted list is full, and what to do about it."""
    global _full_logged  # noqa: PLW0603 - logged once per process
    if not _full_logged:
        _full_logged = True
        LOG.warning("%s is full (%d bytes, at most %d): the CRL URLs of further signers are not noted, so the "
                    "background fetch does not get their CRLs; trim or remove the file (a restarted "
                    "worker notes the signers it sees again) or fetch their CRLs with --document",
                    folder / WANTED_LIST, size, MAX_WANTED_BYTES)
