"""The one user-error type. The CLI turns a :class:`UserError` into a one-line message with
exit status 2; any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (arguments, files, settings). A ``ValueError``, so
    ``except ValueError`` in user code keeps working."""
