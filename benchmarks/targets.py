"""The performance targets of ``POST /v1/verify`` and of the core, and one way of printing a figure beside its target.

Every figure line reads ``<name>: <value>   target <op> <target> (aim <aim>)   <verdict>``, where the verdict is
``MISS`` (target not met), ``met`` (target met, aim not) or ``aim met``. Targets without an aim print none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A bound a figure must keep: at least (``higher``) or at most ``bound``, with an optional stricter ``aim``."""

    name: str
    bound: float
    higher: bool
    aim: float | None = None
    unit: str = ""
    #: "<" instead of "<=" for a strict upper bound (the maximum latency).
    strict: bool = False

    def met(self, value: float, limit: float) -> bool:
        """Whether ``value`` keeps ``limit`` in this target's direction."""
        if self.higher:
            return value >= limit
        return value < limit if self.strict else value <= limit

    def line(self, value: float, *, digits: int = 2, note: str = "") -> str:
        """The figure line for ``value``; ``note`` is appended after the verdict."""
        operator = ">=" if self.higher else ("<" if self.strict else "<=")
        unit = f" {self.unit}" if self.unit else ""
        aim = f" (aim {self.aim:g})" if self.aim is not None else ""
        if not self.met(value, self.bound):
            verdict = "MISS"
        elif self.aim is not None and self.met(value, self.aim):
            verdict = "aim met"
        else:
            verdict = "met"
        shown = f"{value:.{digits}f}{unit}"
        tail = f"   {note}" if note else ""
        return f"{self.name + ':':<34} {shown:>10}   target {operator} {self.bound:g}{unit}{aim}   {verdict}{tail}"


#: (a) verified documents per second over the bare echo's requests per second under gunicorn's default (sync)
#: workers, same machine, same run.
RATIO_TO_ECHO: Final = Target(name="verify/echo ratio", bound=0.6, aim=0.75, higher=True)
#: (b) latency of a separate paced client while the load saturates the service.
P99_UNDER_LOAD_MS: Final = Target(name="p99 under load", bound=50, aim=25, higher=False, unit="ms")
MAX_UNDER_LOAD_MS: Final = Target(name="max under load", bound=250, higher=False, unit="ms", strict=True)
#: (c) latency at half of the measured capacity.
P99_AT_HALF_MS: Final = Target(name="p99 at half capacity", bound=10, higher=False, unit="ms")
#: (d) documents verified per second over bare RSA-2048 verifications per second, one core.
CORE_RATIO: Final = Target(name="core/bare RSA-2048 ratio", bound=0.3, aim=0.4, higher=True)


def named(target: Target, name: str) -> Target:
    """``target`` under another printed name (``verify/echo(sync) ratio``)."""
    return Target(name=name, bound=target.bound, higher=target.higher, aim=target.aim, unit=target.unit,
                  strict=target.strict)


#: Attestation results on over off: CPU per verified request (service processes and Redis) may grow by 10 % at
#: most for the signed EAR token every accepted document gets.
RESULTS_CPU_RATIO: Final = Target(name="CPU ratio results on/off", bound=1.10, higher=False)
