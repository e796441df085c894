"""The one error type the CLI turns into a one-line message and an exit code."""


class InfoptError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class QualityGateError(InfoptError):
    """A measured quality figure crossed a user-given limit (CI gate)."""

    exit_code = 1
