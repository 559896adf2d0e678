"""Shard file names: the one place that builds a name from `shards.pattern` and reads its index back.

The pattern comes from config, and `reprocess` takes it from a *source* folder's `pipeline.yaml`, which is
untrusted: a pattern like `../../x%06d.tar` would write outside the output folder. So a pattern must be a plain
file name (no path separator, not hidden, no `..`) ending in `.tar` (what `list_shards` picks up in a folder), with
exactly one `%d`-style field (`%d`, `%6d` or `%06d`); a literal percent sign is written `%%`.
"""

from __future__ import annotations

import re

from .errors import UserError

_FIELD = r"%(?:0?[1-9]\d?)?d"  # %d, %6d, %06d


class PatternError(UserError):
    """A `shards.pattern` that is not a safe one-field file name (the message is one line)."""


def check_pattern(pattern: str) -> str:
    """`pattern` itself when it is a plain `.tar` file name with exactly one `%d`-style field, else PatternError."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"shards.pattern must be a file name like shard-%06d.tar; got {pattern!r}")
    if "/" in pattern or "\\" in pattern or "\0" in pattern or ".." in pattern or pattern.startswith("."):
        raise PatternError(f"shards.pattern {pattern!r} must be a plain file name (no '/', '\\', '..' or leading '.')")
    if not pattern.endswith(".tar"):
        raise PatternError(f"shards.pattern {pattern!r} must end in .tar")
    bare = pattern.replace("%%", "")
    if bare.count("%") != 1 or not re.search(_FIELD, bare):
        raise PatternError(f"shards.pattern {pattern!r} must hold exactly one %d-style field (e.g. shard-%06d.tar)")
    return pattern


def shard_name(pattern: str, index: int) -> str:
    """The file name of shard `index` (>= 0)."""
    if index < 0:
        raise ValueError(f"shard index {index} is negative")
    return check_pattern(pattern) % index


def shard_index(pattern: str, name: str) -> int:
    """The index of shard file `name` (a base name, or a path whose last part is one) made with `pattern`.

    The inverse of `shard_name`: `as2m-v2-%06d.tar` reads `as2m-v2-000003.tar` back as 3. A name the pattern did
    not make raises ValueError."""
    check_pattern(pattern)
    base = name.rsplit("/", 1)[-1]
    head, tail = re.split(_FIELD, pattern.replace("%%", "\0"), maxsplit=1)
    rx = re.escape(head.replace("\0", "%")) + r"(\d+)" + re.escape(tail.replace("\0", "%"))
    match = re.fullmatch(rx, base)
    if not match:
        raise ValueError(f"{name!r} is not a shard name made by the pattern {pattern!r}")
    return int(match.group(1))
