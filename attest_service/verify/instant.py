"""The instant a verification is made at, as every public call takes it: ``at``, a timezone-aware datetime.

A wrong ``at`` is the caller's programming error, not a setting of the operator's nor a refusal of the
document: it raises :class:`TypeError` (not a datetime) or :class:`ValueError` (a naive one), as Python's
own functions do for a wrong argument.
"""

from __future__ import annotations

from datetime import datetime


def aware_instant(at: object, *, name: str = "at") -> datetime:
    """Return ``at`` when it is a timezone-aware datetime; raise TypeError or ValueError otherwise.

    ``name`` is how the message names the argument.
    """
    if not isinstance(at, datetime):
        raise TypeError(f"{name} must be a timezone-aware datetime, not {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime (for example datetime.now(UTC)), not a naive one")
    return at


__all__ = ["aware_instant"]
