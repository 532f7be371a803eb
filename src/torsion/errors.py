"""The one exception type users see."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every line break (``str.splitlines``'s set) replaced by a single space."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class TorsionError(Exception):
    """A user-facing error. Its message is one line naming the problem and the fix.

    The CLI prints it as ``torsion: error: <message>`` and exits with status 2. A message that
    quotes user data (a file's line, a library's error text) is folded onto one line here, so
    the promise holds whatever the data contains.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))
