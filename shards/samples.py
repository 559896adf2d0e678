"""Tar members → samples: the one grouping every reader uses (streaming reader, index, reprocess, stats, inspect,
verify), so a member name means the same thing on every path.

The rule is webdataset's (`base_plus_ext` + `group_by_keys`): a member's key is its name up to the first dot of its
base name, consecutive members with one key are one sample, `__meta__` members and names without a suffix are not
sample members. On top of it, the same on every path: a leading `./` is dropped (what `tar -C dir -cf x.tar .`
writes); what the toolkit does not take is never dropped without a word. Names that are not sample members
(directories, `__meta__`, ...) are skipped and named in one warning per shard; a sample whose key is outside the key
alphabet (a directory, `../`, an absolute path), which holds a member outside the schema
(`shards.schema.MEMBER_KINDS`), the same member twice, or a member that is not a regular file (a FIFO or link named
like one of its frames: its span covers it, so a ranged read of the sample meets it as a scan does), or whose key
comes back later in the shard, is yielded with its `problem`, which `shards.reader.decode_sample` raises as a
`BadSample` (counted and named by every reader).
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from .schema import BadSample, check_key, member_kind
from .tar import NotRegular, ShardError, read_members

log = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


@dataclass
class Group:
    """One sample's members in tar order (lower-case suffix → bytes), where they lie in the shard ([start, end):
    its first header through its last member's padding), and what is wrong with it, if anything."""

    key: str
    url: str
    members: dict[str, bytes] = field(default_factory=dict)
    start: int = 0
    end: int = 0
    problem: str | None = None

    def raw(self) -> dict:
        """The raw sample as webdataset's `group_by_keys` gives it (`__key__`, `__url__`, bytes by suffix), plus
        `__problem__` when there is one."""
        raw = {"__key__": self.key, "__url__": self.url, **self.members}
        if self.problem is not None:
            raw["__problem__"] = self.problem
        return raw


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case suffix) of a member name: a leading `./` dropped, then webdataset's rule; None for a name
    that is not a sample member (webdataset's `__meta__` members, names without a suffix). The key is not
    checked here."""
    while name.startswith("./"):
        name = name[2:]
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def group_members(members: Iterable[tuple[str, bytes, int, int]], url: str,
                  skipped: list[tuple[str, str]]) -> Iterator[Group]:
    """Samples of (name, bytes, start, end) members in tar order (`shards.tar.read_members`, non-regular ones
    included); names that are not sample members are appended to `skipped` (with what they are)."""
    seen: set[str] = set()
    current: Group | None = None
    prefix = None  # "key." of the current sample while its key is good: the common case, without the regexes
    for name, data, start, end in members:
        if prefix is not None and name.startswith(prefix) and "/" not in name and not name.endswith("__"):
            key, suffix = current.key, name[len(prefix):].lower()
        else:
            split = split_name(name)
            if split is None:
                skipped.append((name, data if isinstance(data, NotRegular) else "not a sample member"))
                continue
            key, suffix = split
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Group(key, url, start=start)
            try:
                check_key(key)
            except BadSample as exc:
                current.problem = str(exc)
            if key in seen and current.problem is None:
                current.problem = f"key {key!r} comes back later in the shard (a split or duplicated sample)"
            seen.add(key)
            prefix = f"{key}." if current.problem is None else None
        if isinstance(data, NotRegular):
            current.problem = current.problem or f"member {name!r} is a {data}, not a regular file"
            current.end = end
            continue
        if current.problem is None:
            if member_kind(suffix) is None:
                current.problem = f"member {name!r} is not part of the cavmae sample schema"
            elif suffix in current.members:
                current.problem = f"member {name!r} appears twice"
        current.members.setdefault(suffix, data)
        current.end = end
    if current is not None:
        yield current


def read_groups(stream: IO[bytes], url: str, fragment: bool = False) -> Iterator[Group]:
    """The samples of one shard stream (or of one sample's byte span, `fragment`), logging one warning that
    counts and names the members skipped (not regular files, not sample members). `shards.tar.ShardError` for a
    shard that cannot be read faithfully."""
    skipped: list[tuple[str, str]] = []
    try:
        yield from group_members(read_members(stream, url, fragment, others=True), url, skipped)
    finally:
        if skipped:
            named = ", ".join(f"{name!r} ({why})" for name, why in skipped[:5])
            log.warning("%s: skipped %d member(s) that are not sample files: %s%s", url, len(skipped), named,
                        ", ..." if len(skipped) > 5 else "")


def span_group(data: bytes, url: str, key: str, where: str = "the index puts") -> Group:
    """The one sample that the bytes `data` of one sample's span (its manifest `offset`/`length`: `shards.index`,
    reprocess, verify) hold, grouped as every reader groups a whole shard (`read_groups`, warnings included).
    BadSample when the span holds anything but exactly sample `key` (none, another, or two: the shard changed
    since, or an untrusted manifest); `shards.tar.ShardError` naming the sample when it is not whole tar
    members."""
    try:
        groups = list(read_groups(io.BytesIO(data), url, fragment=True))
    except tarfile.TarError as exc:
        raise ShardError(f"{url}: sample {key!r}: {str(exc).removeprefix(f'{url}: ')}") from None
    if len(groups) != 1 or groups[0].key != key:
        found = ", ".join(repr(g.key) for g in groups) or "no member"
        raise BadSample(f"{url}: {found} found where {where} sample {key!r}")
    return groups[0]
