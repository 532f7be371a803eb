"""The one exception type users see."""


class TorsionError(Exception):
    """A user-facing error. Its message is one line naming the problem and the fix.

    The CLI prints it as ``torsion: error: <message>`` and exits with status 2.
    """
