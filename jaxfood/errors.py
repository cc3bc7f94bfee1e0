"""Errors a user can cause.

Every problem with the user's input (a file, a column, a config key, a checkpoint) is raised as a
:class:`UserError` whose message is one line naming the file, the field and what was expected.
The CLI turns it into ``error: <message>`` on stderr and exit status 2 (traceback only with
``--debug``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is a single line that says how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class GraphError(UserError):
    """A heterogeneous graph that violates the schema (bad index, NaN attribute, shape mismatch)."""


class ConfigError(UserError):
    """An unknown configuration key or a value of the wrong type."""


class CheckpointError(UserError):
    """A checkpoint that is missing, of the wrong shape or of an unknown format."""
