"""Progress bars for long commands (tqdm, which nnU-Net installs).

A bar is drawn only where someone watches: on a terminal, and not after ``--quiet``. Piped or redirected output
(logs, CI, benchmarks parsing stdout) gets no bar, only the commands' own one-line summaries. Bars go to stderr,
so stdout stays what the command prints.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO, TypeVar

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """`--quiet`: no bars for the rest of the process."""
    global _quiet
    _quiet = bool(quiet)


def shows_bar(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return not _quiet and callable(isatty) and bool(isatty())


def bar(items: Iterable[T], desc: str, unit: str, total: int | None = None, stream: TextIO | None = None
        ) -> Iterable[T]:
    """`items`, with a bar (count, elapsed time, ETA) on `stream` (stderr) when it is a terminal."""
    stream = sys.stderr if stream is None else stream
    if not shows_bar(stream):
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit=unit, total=total, file=stream, leave=False, dynamic_ncols=True)
