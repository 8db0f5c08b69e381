"""The user-error type every command shares.

A :class:`UserError` is a mistake in what the user gave us (a path, a permission, a
config value, data that does not fit the model): ``longsky`` prints its message as one
line from rank 0 and exits with status 2. Anything else escaping a command is our bug
and keeps its traceback. The specific errors (``ConfigError``, ``CorpusError``,
``CheckpointError``, ...) derive from it, and from ``ValueError`` as before.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the file, line, key or value."""


# Exit statuses of every ``longsky`` command.
EXIT_OK = 0
EXIT_FAILED = 1  # the run itself failed (e.g. a plan that does not fit with --require-fit)
EXIT_USER_ERROR = 2  # usage, config, path, permission or data error
