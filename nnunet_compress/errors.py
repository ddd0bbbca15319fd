"""User-facing errors.

Every problem a user can fix (a wrong rank, a missing checkpoint, plans without a compression section, ...)
is raised as :class:`CompressError`. The CLI prints its message on one line and exits non-zero; any other
exception is a bug and is shown with its traceback only under ``--debug``.
"""


class CompressError(Exception):
    """A problem with the user's input, stated together with the fix."""


def first_line(e: BaseException) -> str:
    """The first lines of an exception's message, joined and capped: torch's size-mismatch and OpenVINO's
    conversion errors run to hundreds of lines, and an `error:` line must stay one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:3])[:400]
