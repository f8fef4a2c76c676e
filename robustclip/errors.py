"""The one exception type that the CLI turns into a one-line error and exit code 2."""


class RobustclipError(Exception):
    """Bad input or an unmet precondition, explained in one line for the user."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name if it has none): how a library's
    long error becomes part of a one-line RobustclipError."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
