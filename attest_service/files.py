"""Reading operator-supplied files with a size bound, so that a wrong path cannot stall start-up."""

from __future__ import annotations

from pathlib import Path

from attest_service.errors import ConfigurationError


def read_bounded(path: Path, limit: int, *, what: str) -> bytes:
    """Read ``path`` whole; raise ConfigurationError (naming ``what``) if unreadable or over ``limit`` bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigurationError(f"{what}: cannot read {path} ({exc.strerror})") from exc
    if len(data) > limit:
        raise ConfigurationError(f"{what}: {path} is larger than {limit} bytes")
    return data
