"""The one error type users see: a single line naming the file and the key or shape at fault."""


class QkvxError(Exception):
    """An error the user can act on. The CLI prints `error: <message>` and exits with code 2."""


class GateFailed(QkvxError):
    """A check ran and its gate failed (validation, quality): exit code 1, not a usage error."""

    exit_code = 1
