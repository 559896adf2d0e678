"""The one tar layer: every shard is read and written here.

Reading (`read_members`): for every archive Python's `tarfile` reads, every regular member comes back with the
name, size and bytes `tarfile` gives it (ustar with its name prefix, v7, GNU and old-GNU with long names, pax with
`path`/`size`/`linkpath`; pax global headers are skipped). The rules below follow `tarfile`'s own (CPython 3.11
`TarInfo.frombuf` / `_proc_member`), including which extended header wins when several precede one member (the
first: `tarfile` applies them from the innermost out). Members a shard never holds (links, directories, devices,
FIFOs, unknown types) are skipped and reported to the caller. Anything that cannot be read faithfully is a
`ShardError` for the whole shard, never different bytes: GNU sparse members (old or pax), a pax global header that
would rename or resize later members, a bad checksum, a member over MAX_MEMBER_BYTES, a compressed file, and any
truncation: inside a header, data or padding, or a missing end-of-archive marker (two zero blocks; `tarfile`
accepts an archive without one, GNU tar warns, we refuse: a cut at a member boundary would otherwise read as a
clean, shorter shard).

It is our own parser, not `tarfile`, for speed: `tarfile` costs ~25 µs of Python per member, ~0.3 ms per sample of
12 members, which is most of a training sample's CPU budget (`bench/loader.py`).

Writing (`TarWriter`): pax format through `tarfile`'s header encoder with every varying field fixed (mtime, uid,
gid, owner names, mode), so the same members give the same bytes. A name that fits ustar (every key up to 88
characters) gets a plain ustar header, byte for byte what the former ustar writer wrote; a longer one gets a pax
`path` record, which every reader above (`tarfile`, webdataset, GNU tar, bsdtar) understands.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from typing import IO, Any, Iterator

BLOCK = 512
MAX_MEMBER_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 20  # a GNU long name or a pax header (ours have none or one record)
_ZERO = bytes(BLOCK)
_REGULAR = frozenset((b"0", b"\0", b"7"))  # tarfile's REGULAR_TYPES less GNU sparse (refused)
_NO_DATA = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
            b"5": "directory", b"6": "FIFO"}  # tarfile never skips data after these, whatever their size says
_EXTENDED = frozenset((b"x", b"X", b"g", b"L", b"K"))  # headers that describe the next member (g: all later ones)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"))


class ShardError(tarfile.ReadError):
    """A shard that cannot be read faithfully (the message is one line and names the shard). A `tarfile.ReadError`,
    so every reader that skips an unreadable shard skips this one too."""


def _number(field: bytes) -> int:
    """A numeric header field as `tarfile.nti` reads it: octal text, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    """A name field as `tarfile` decodes it (up to the first NUL; UTF-8, undecodable bytes as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _byte_sum(header: bytes) -> int:
    """sum(header) of a 512-byte block, ~10x faster than Python's sum (which is most of a member's parse cost):
    adler32's low 16 bits are 1 + the sum of the bytes modulo 65521, and 256 bytes sum to at most 65280, so each
    half's sum is exact."""
    view = memoryview(header)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    if stored == _byte_sum(header) - sum(header[148:156]) + 256:
        return True
    return stored == 256 + sum(struct.unpack_from("148b8x356b", header))  # old Sun/NeXT tars sum signed bytes


def pax_records(data: bytes) -> dict[str, str]:
    """Records "LENGTH key=value\\n" of a pax header; ValueError for any record that is not exactly that (a length
    of 0 or one that runs past the header would otherwise loop forever or read garbage)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos, pos + 21)
        digits = data[pos:space]
        length = int(digits) if digits.isdigit() else -1
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1:end] != b"\n" or b"=" not in data[space:end]:
            raise ValueError(f"bad pax record at byte {pos}")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _read(read: Any, n: int) -> bytes:
    """Up to n bytes; fewer only at the end of the stream (a remote stream may return short reads)."""
    data = read(n)
    while len(data) < n:
        more = read(n - len(data))
        if not more:
            break
        data += more
    return data


class NotRegular(str):
    """What a non-regular member is ("FIFO", "symbolic link", ...), yielded in place of its bytes by
    `read_members(others=True)`."""


def read_members(stream: IO[bytes], url: str, fragment: bool = False, *, others: bool = False
                 ) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, bytes, start, end) of every regular member of a tar stream, read sequentially (local or remote);
    `start` is the offset of the member's first header (a long-name or pax header in front of it included), `end`
    the offset after its padding. `others`: the non-regular members too, with a `NotRegular` saying what each is in
    place of the bytes (a grouping must know which sample such a member sits in, `shards.samples`).

    `fragment`: the stream is a byte range of a shard holding whole members and no end-of-archive marker (one
    sample's span, `shards.index`), so it ends cleanly at a member boundary. Raises `ShardError` naming `url`."""
    read = stream.read
    pos = 0
    header = _read(read, BLOCK)
    if not fragment:
        for magic, kind in _COMPRESSED:
            if header.startswith(magic):
                raise ShardError(f"{url}: is a {kind}-compressed file, not a plain tar (decompress it first)")
    start = 0
    names: list[str] = []  # long names and pax paths waiting for their member; the first one wins, as in tarfile
    sizes: list[int] = []  # pax sizes waiting for their member
    pending = False
    while True:
        if len(header) < BLOCK:
            if fragment and not header and not pending:
                return
            what = "inside a tar header" if header or pending else "before the end-of-archive marker"
            raise ShardError(f"{url}: truncated {what} at byte {pos + len(header)}")
        if header == _ZERO:
            if fragment or pending:
                raise ShardError(f"{url}: unexpected end-of-archive marker at byte {pos}")
            if _read(read, BLOCK) != _ZERO:  # tarfile writes two zero blocks, as GNU tar and bsdtar do
                raise ShardError(f"{url}: truncated end-of-archive marker at byte {pos} (one zero block of two)")
            return
        try:  # the common case parsed inline: this runs once per member, ~12 times per sample
            stored = header[148:156]
            if (header[148] >= 0o200 or int(stored.split(b"\0", 1)[0].strip() or b"0", 8)
                    != _byte_sum(header) - sum(stored) + 256) and not _checksum_ok(header):
                raise ShardError(f"{url}: bad tar header checksum at byte {pos}")
            kind = header[156:157]
            extended = kind in _EXTENDED
            if sizes and not extended:
                size = sizes[0]
            elif header[124] < 0o200:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            else:
                size = _number(header[124:136])
        except ValueError:
            raise ShardError(f"{url}: invalid tar header at byte {pos}") from None
        if kind == b"\0" and header[:100].split(b"\0", 1)[0].endswith(b"/"):
            kind = b"5"  # v7: a directory is a regular file whose name ends in a slash
        if kind == b"S":
            raise ShardError(f"{url}: GNU sparse member at byte {pos} (not supported in a shard)")
        if kind in _NO_DATA:
            size = 0
        limit = MAX_HEADER_BYTES if extended else MAX_MEMBER_BYTES
        if not 0 <= size <= limit:  # untrusted: never allocate what a header merely claims
            raise ShardError(f"{url}: member size {size} at byte {pos} outside 0..{limit}")
        data = read(size)
        if len(data) < size:
            data += _read(read, size - len(data))
            if len(data) < size:
                raise ShardError(f"{url}: truncated inside a member's data at byte {pos + BLOCK + len(data)}")
        pad = -size % BLOCK
        after = read(pad + BLOCK)  # the padding and the next header in one read
        if len(after) < pad + BLOCK:
            after += _read(read, pad + BLOCK - len(after))
            if len(after) < pad:
                at = pos + BLOCK + size + len(after)
                raise ShardError(f"{url}: truncated inside a member's padding at byte {at}")
        end = pos + BLOCK + size + pad
        if extended:
            try:
                if kind == b"L":
                    names.append(_text(data))
                elif kind != b"K":
                    records = pax_records(data)
                    if any(k.startswith("GNU.sparse.") for k in records):
                        raise ShardError(f"{url}: GNU sparse member (pax) at byte {pos} (not supported in a shard)")
                    if kind == b"g":
                        if {"path", "size"} & records.keys():
                            raise ShardError(f"{url}: a pax global header at byte {pos} renames or resizes members")
                    else:
                        if "path" in records:
                            names.append(records["path"].rstrip("/"))
                        if "size" in records:
                            sizes.append(int(records["size"]))
            except ValueError:
                raise ShardError(f"{url}: invalid GNU long name or pax header at byte {pos}") from None
            pending = pending or kind != b"g"
        else:
            name = names[0] if names else _text(header[:100])
            if header[345] and not names:  # the ustar name prefix, applied as tarfile does
                name = _text(header[345:500]) + "/" + name
            if kind in _REGULAR:
                yield name, data, start, end
            elif others:
                yield name, NotRegular(_NO_DATA.get(kind, f"tar type {kind!r}")), start, end
            names, sizes, pending, start = [], [], False, end
        if not pending and kind == b"g":
            start = end
        pos, header = end, after[pad:]


class TarWriter:
    """Deterministic tar members onto a binary file (see the module docstring); `close()` writes the
    end-of-archive marker and pads to tar's record size, as `tarfile` does."""

    def __init__(self, file: IO[bytes]):
        self._tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)

    @property
    def offset(self) -> int:
        return self._tar.offset

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
