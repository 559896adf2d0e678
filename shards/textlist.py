"""The users' text and CSV lists (label indices, labels CSVs, path lists, the datasets' own lists), opened one way on
both sides, and their headers checked the same way.

A list saved by a spreadsheet or Windows tool ("CSV UTF-8") starts with a byte-order mark; opened as plain UTF-8, it
sticks to the first header cell (`\\ufefflabel`), and that column, or the first path, is lost without a word.
`utf-8-sig` drops it (and reads a list without one unchanged). A header without the columns its reader needs is one
line naming the file and those columns, never a `KeyError` further on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from .errors import UserError

ENCODING = "utf-8-sig"
HEADER_SHOWN = 120  # characters of a header quoted in the error (a data row taken for one can be long)


def open_list(path: str | Path) -> TextIO:
    """`path` for reading as text: UTF-8 without its byte-order mark, newlines left to the csv module."""
    return open(path, newline="", encoding=ENCODING)


def require_columns(path: str | Path, header: Sequence[str] | None, required: Iterable[str], what: str,
                    error: type[UserError] = UserError) -> None:
    """Raise `error` naming `path` and the columns of `required` that `header` lacks (`what` the list is)."""
    missing = [c for c in required if c not in (header or ())]
    if missing:
        have = ",".join(header)[:HEADER_SHOWN] if header else "none"
        raise error(f"{path}: {what} needs the column(s) {', '.join(missing)} in its header (it has: {have})")
