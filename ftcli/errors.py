"""The two kinds of failure ftcli reports, and their exit codes (DESIGN.md, Commands)."""


class FtcliError(Exception):
    """Base class: a failure with a message meant for a person, printed without a traceback."""

    exit_code = 1


class UserError(FtcliError):
    """Bad input: a recipe, data file or argument. Exit code 2; the message names the key, file or row."""

    exit_code = 2


class RunError(FtcliError):
    """A failure during a run (NaN loss, interrupted, export mismatch). Exit code 1."""

    exit_code = 1
