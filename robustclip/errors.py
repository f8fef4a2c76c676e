"""The one exception type that the CLI turns into a one-line error and exit code 2."""


class RobustclipError(Exception):
    """Bad input or an unmet precondition, explained in one line for the user."""
