"""Text that came from a document or a request, made safe to put in a log line.

A log line is one record. A caIssuers URL, an issuer name, a nonce or a request path is chosen by whoever sent
the document or the request: written as it is, a newline in it ends the service's line and starts one of the
sender's making, and terminal control sequences rewrite what an operator's terminal shows. Every such string
goes through :func:`loggable` before it reaches a log call, so a line of the log is always the service's.
"""

from __future__ import annotations

from typing import Final

#: Characters of an outside string kept in a log line; longer strings are cut and end with :data:`CUT_MARK`.
MAX_LOGGED_CHARS: Final = 200
#: What a cut string ends with.
CUT_MARK: Final = "..."

_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    if point < 0x10000:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def loggable(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    r"""``str(text)`` as one line of printable characters, at most ``limit`` characters of it.

    Every character Python does not call printable (control and format characters, line and paragraph
    separators, spaces other than the plain space) and the backslash itself are written as backslash escapes
    (``\n``, ``\x1b``, ``\u2028``), so the result holds no line break, no terminal control sequence, and
    no escape that could be mistaken for one of these. A string longer than ``limit`` is cut before escaping
    and ends with :data:`CUT_MARK`.
    """
    value = str(text)
    cut = len(value) > limit
    if cut:
        value = value[:limit]
    if not value.isprintable() or "\\" in value:
        value = "".join(char if char.isprintable() and char != "\\" else _escape(char) for char in value)
    return value + CUT_MARK if cut else value
