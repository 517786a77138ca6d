"""The body gate's memory bounds, counted as bytes arrive: per worker and per source.

Two bodies are read at once as two greenlets of a worker would: the stream of the first reads the second
body through the same gate half way through its own.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from attest_service.errors import AttestError
from attest_service.web.body import PIECE_BYTES, BodyGate

BODY = b"x" * (4 * PIECE_BYTES)


class Interleaving(io.BytesIO):
    """A body whose second read lets ``meanwhile`` run, as another request would while this one waits."""

    def __init__(self, data: bytes, meanwhile: Callable[[], None]) -> None:
        super().__init__(data)
        self._reads = 0
        self._meanwhile = meanwhile

    def read(self, size: int | None = -1, /) -> bytes:
        self._reads += 1
        if self._reads == 2:
            self._meanwhile()
        return super().read(size)


def environ(stream: io.BytesIO, length: int) -> dict[str, object]:
    return {"CONTENT_LENGTH": str(length), "wsgi.input": stream}


def second_body(gate: BodyGate, source: str, outcome: list[str]) -> Callable[[], None]:
    def read() -> None:
        try:
            gate.read(environ(io.BytesIO(BODY), len(BODY)), source)
        except AttestError as exc:
            outcome.append(exc.code)
        else:
            outcome.append("read")
    return read


@pytest.mark.parametrize(("other_source", "worker_pieces", "source_pieces", "expected"), [
    ("198.51.100.2", 4, 8, "service_busy"),  # another source: the worker's budget is what runs out
    ("198.51.100.1", 8, 4, "rate_limited"),  # the same source: its share runs out first
])
def test_bodies_held_at_once_are_bounded(other_source: str, worker_pieces: int, source_pieces: int,
                                         expected: str) -> None:
    gate = BodyGate(10, max_buffered_bytes=worker_pieces * PIECE_BYTES,
                    max_bytes_per_source=source_pieces * PIECE_BYTES)
    outcome: list[str] = []
    first = Interleaving(BODY, second_body(gate, other_source, outcome))
    # The first body holds one piece when the second arrives, which cannot take its four on top.
    assert gate.read(environ(first, len(BODY)), "198.51.100.1") == BODY
    assert outcome == [expected]
    assert gate.buffered_bytes == 0  # everything counted was given back


def test_bodies_within_the_bounds_are_read_side_by_side() -> None:
    gate = BodyGate(10, max_buffered_bytes=8 * PIECE_BYTES, max_bytes_per_source=8 * PIECE_BYTES)
    outcome: list[str] = []
    first = Interleaving(BODY, second_body(gate, "198.51.100.2", outcome))
    assert gate.read(environ(first, len(BODY)), "198.51.100.1") == BODY
    assert outcome == ["read"]
    assert gate.buffered_bytes == 0


def test_a_body_refused_unread_is_dropped_after_the_answer() -> None:
    gate = BodyGate(10)
    stream = io.BytesIO(BODY)
    request = environ(stream, len(BODY))
    assert gate.unread_body_may_remain(request)
    gate.discard_rest(request)
    assert stream.read() == b""
    assert not gate.unread_body_may_remain(request)
