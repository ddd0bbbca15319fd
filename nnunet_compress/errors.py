"""User-facing errors.

Every problem a user can fix (a wrong rank, a missing checkpoint, plans without a compression section, ...)
is raised as :class:`CompressError`. The CLI prints its message on one line and exits non-zero; any other
exception is a bug and is shown with its traceback only under ``--debug``.
"""


class CompressError(Exception):
    """A problem with the user's input, stated together with the fix."""


def first_line(e: BaseException, with_type: bool = False) -> str:
    """The first lines of an exception's message, joined and capped: torch's size-mismatch and OpenVINO's
    conversion errors run to hundreds of lines, and an `error:` line must stay one line.

    ``with_type`` prefixes the exception's class (``RuntimeError: ...``) for messages that report a foreign
    library's failure, such as the engine's fallback warning, where the class is often the most telling part.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = "; ".join(lines[:3])
    if with_type:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text[:400]
