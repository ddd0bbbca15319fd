"""User-facing errors.

Every problem a user can fix (a wrong rank, a missing checkpoint, plans without a compression section, ...)
is raised as :class:`CompressError`. The CLI prints its message on one line and exits non-zero; any other
exception is a bug and is shown with its traceback only under ``--debug``.
"""


class CompressError(Exception):
    """A problem with the user's input, stated together with the fix."""
