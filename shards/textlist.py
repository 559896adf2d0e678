"""The users' text and CSV lists (label indices, labels CSVs, path lists, the datasets' own lists), opened on both
sides with `shards.store.open_text` (a regular file, UTF-8 without its byte-order mark), their headers checked the
same way: a header without the columns its reader needs is one line naming the file and those columns, never a
`KeyError` further on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import UserError

HEADER_SHOWN = 120  # characters of a header quoted in the error (a data row taken for one can be long)


def require_columns(path: str | Path, header: Sequence[str] | None, required: Iterable[str], what: str,
                    error: type[UserError] = UserError) -> None:
    """Raise `error` naming `path` and the columns of `required` that `header` lacks (`what` the list is)."""
    missing = [c for c in required if c not in (header or ())]
    if missing:
        have = ",".join(header)[:HEADER_SHOWN] if header else "none"
        raise error(f"{path}: {what} needs the column(s) {', '.join(missing)} in its header (it has: {have})")
