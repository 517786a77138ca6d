"""Reading operator-supplied files with a size bound, so that a wrong path cannot stall start-up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from attest_service.errors import ConfigurationError


def read_bounded(path: Path, limit: int, *, what: str) -> bytes:
    """Read ``path`` whole; raise ConfigurationError (naming ``what``) if unreadable or over ``limit`` bytes.

    Only a regular file (symbolic links followed) is read: a FIFO or a device under a pin's name would block
    the reader (the gunicorn master's timer among them) or never end, so it is refused without waiting.
    """
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not wait; it changes nothing for a regular file.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigurationError(f"{what}: {path} is not a regular file")
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path} ({exc.strerror})") from exc
    if len(data) > limit:
        raise ConfigurationError(f"{what}: {path} is larger than {limit} bytes")
    return data
