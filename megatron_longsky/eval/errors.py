"""The user-error type of the evaluation commands (``needle``, ``eval``, ``synl-eval``).

A haystack, document file, chat template or length that does not fit is the user's
input, not our bug: :class:`EvalInputError` is a :class:`~megatron_longsky.errors.UserError`,
so the command prints one line naming the file or value and exits with status 2.
"""

from __future__ import annotations

from megatron_longsky.errors import UserError


class EvalInputError(UserError, ValueError):
    """An evaluation input (haystack, data, template, length) that cannot be used."""
