"""The faults the IMDS emulator can inject (``--fault KIND[:N]``).

Apart from the server, so that the command line can describe them without loading the web stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from attest_service.errors import ConfigurationError

FaultKind = Literal["cached-nonce", "410", "500"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("cached-nonce", "410", "500")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One injected fault: ``kind`` answers the first ``count`` eligible requests."""

    kind: FaultKind
    count: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``KIND[:COUNT]`` (count defaults to 1); raise :class:`ConfigurationError` when unusable."""
        kind, _, count_text = text.partition(":")
        if kind not in FAULT_KINDS:
            raise ConfigurationError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        try:
            count = int(count_text) if count_text else 1
        except ValueError:
            raise ConfigurationError(f"fault count {count_text!r} is not an integer") from None
        if count < 1:
            raise ConfigurationError(f"fault count must be at least 1, got {count}")
        return cls(kind=kind, count=count)


__all__ = ["FAULT_KINDS", "Fault", "FaultKind"]
