"""The one error type users see: a single line naming the file and the key or shape at fault."""


class QkvxError(Exception):
    """An error the user can act on. The CLI prints `error: <message>` and exits with code 2."""
