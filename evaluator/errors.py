"""Errors the CLI turns into one clear sentence and an exit code, never a traceback."""


class UserError(Exception):
    """Bad input from the person at the keyboard: a path, an option, a file. Exit code 2."""

    exit_code = 2


class DataError(UserError):
    """A data file that is missing, corrupt or does not match its pinned hash."""


class InvalidModel(Exception):
    """The model cannot be scored; the message is one of scoring.Refusal's fixed sentences, which name
    what went wrong and never a document, position or size of the model's choosing. Here rather than
    in scoring.py so that the runner can catch it without importing torch."""
