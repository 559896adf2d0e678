"""The sample schema: keys, member names, and the safe encoders/decoders of every member.

One video clip (or one window of it) is one WebDataset sample:

    {key}.json          metadata (see `META_FIELDS`)
    {key}.fbank.npy     float16 [T, num_mel_bins], unpadded, unnormalised
    {key}.frame{i}.jpg  the extracted frames, i = 0 .. num_frames-1
    {key}.flac          optional 16 kHz mono waveform
    {key}.labels.txt    optional label indices as text, "3,17" (not `.cls`: stock webdataset decodes `.cls`
                        as a single int and fails on multi-label samples)

The members are the table `MEMBER_KINDS` (suffix, field of the decoded sample, decoder, writer): the writer
(`record_members`), the reader (`shards.reader.decode_sample`) and reprocess walk it.

WebDataset splits a member name at the first dot of its base name, so keys never contain dots or slashes.
Shards are untrusted input: decoding accepts only the member names above and never unpickles anything.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

META_FIELDS = (
    "video_id", "source", "labels", "duration_s", "fps", "frame_times_s", "audio_frames", "sample_rate",
    "has_audio", "has_video", "config_digest", "window", "clip_start_s", "audio_start_s",
)
LIST_FIELDS = ("segment", "dataset")  # only in samples of a dataset list's rows (plain files' bytes stay as they were)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")  # make_key's alphabet: no '/', '.', '..' or absolute path can pass
# longest sanitised id kept in a key: room for make_key's "_" + 8 hex digits and "_w" + 5 window digits within the
# key alphabet's 128 (every tar writer and reader of the toolkit handles member names of any length: pax `path`)
KEY_MAX = 112
LABEL_INDEX_LIMIT = 10**9  # class indices are 0 .. LABEL_INDEX_LIMIT - 1 (at most 9 digits in labels.txt)


class BadSample(ValueError):
    """A shard member that does not follow the schema (the message names the key and member)."""


def one_line(what: object) -> str:
    """An exception or text as one line (whitespace collapsed), for errors, warnings and manifest rows; an
    exception without a message gives its type name."""
    text = " ".join(str(what).split())
    return text or (type(what).__name__ if isinstance(what, BaseException) else "")


def safe_text(text: str) -> str:
    """`text` as valid UTF-8 text, for what is recorded (video ids, sources in samples and manifests): a file name
    that is not UTF-8 (os gives its bytes back as lone surrogates) gets its bad bytes as `\\xNN` escapes, so the
    same bytes always give the same text, and nothing downstream fails to encode it."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (from a JSON list, say)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def make_key(video_id: str, window: int | None = None) -> str:
    """Deterministic, dot- and slash-free key for a video id (plus window index).

    The id is kept as is when it is already safe; otherwise unsafe characters become '_' and a short hash
    of the original id keeps distinct ids distinct ('a.b' and 'a_b' must not collide).
    """
    safe = _UNSAFE.sub("_", video_id)[:KEY_MAX]
    if safe != video_id or not safe:
        safe = f"{safe}_{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"
    return safe if window is None else f"{safe}_w{window:04d}"


def check_key(key: str) -> str:
    """`key` when it is in the key alphabet (what `make_key` makes), else BadSample: a member name with a
    directory, `../` or an absolute path is refused with its sample."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise BadSample(f"key {key!r} is not made of letters, digits, '_' and '-' only")
    return key


def member_suffix(name: str) -> str:
    """Suffix of a member name after its key, validated against the schema ('frame3.jpg', 'json', ...)."""
    suffix = name.split(".", 1)[1] if "." in name else ""
    if member_kind(suffix) is None:
        raise BadSample(f"member {name!r} is not part of the cavmae sample schema")
    return suffix


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """An npy member without pickle; the header's shape and dtype must account for exactly the bytes that follow
    it, checked before numpy allocates anything (a header may claim terabytes). The array is a writable copy of the
    bytes after the header, as `np.load` gives."""
    shape, fortran, dtype, offset = _npy_header(data[:_npy_header_end(data)])
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != len(data) - offset:
        raise BadSample(f"fbank.npy header claims shape {shape} of {dtype} but holds {len(data) - offset} bytes")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
    return array.reshape(shape, order="F" if fortran else "C")


def _npy_header_end(data: bytes) -> int:
    """Where an npy header ends: magic (6 bytes), version (2), the header's length (2 bytes in version 1, 4 in 2)."""
    width = {b"\x01": 2, b"\x02": 4}.get(data[6:7], 2)
    end = 8 + width + int.from_bytes(data[8:8 + width], "little")
    if end > len(data):
        raise BadSample(f"fbank.npy has a bad header (it claims {end} bytes, the member holds {len(data)})")
    return end


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse an npy header with numpy's own reader (its dict is read with `ast.literal_eval`, ~70 us: the one
    costly step of decoding an fbank), once per distinct header: a shard's samples share a handful of shapes."""
    buf = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = read_header(buf)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise BadSample(f"fbank.npy has a bad header ({' '.join(str(exc).split())})") from None
    if dtype.hasobject or dtype.names is not None or dtype.kind not in "fiub":
        raise BadSample(f"fbank.npy has dtype {dtype}, not a plain number type")
    return shape, fortran, dtype, buf.tell()


def all_finite(array: np.ndarray) -> bool:
    """np.isfinite(array).all(), ~20x faster on float16 (the fbank's type), where numpy has no vector loop for it: a
    half is infinite or NaN exactly when its five exponent bits are all ones, that is when its bits without the
    sign are at least 0x7C00 (one mask and one max: no boolean array)."""
    if array.dtype == np.float16:
        return array.size == 0 or int((array.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(array).all())


def encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sample_members(key: str, meta: dict[str, Any], fbank: np.ndarray | None, jpegs: list[bytes],
                   flac: bytes | None = None, label_indices: list[int] | None = None,
                   **more: Any) -> list[tuple[str, bytes]]:
    """All members of one sample in their fixed order, from the built-in kinds named as arguments and any other
    kind of `MEMBER_KINDS` by its field name in `more` (`record_members` does the work)."""
    return record_members(key, {"meta": meta, "fbank": fbank, "frames": jpegs, "flac": flac,
                                "labels": label_indices, **more})


def record_members(key: str, record: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The members of the sample `record` (field name of a `MEMBER_KINDS` entry → value, as `decode_sample` gives
    them) in the table's order, numbered kinds by index (the order is part of byte-identical output); a field that
    is None, missing or encodes to nothing has no member. A field no kind has is an error, not dropped."""
    if _UNSAFE.search(key):
        raise BadSample(f"key {key!r} contains characters other than letters, digits, '_' and '-'")
    unknown = set(record) - {k.field for k in MEMBER_KINDS}
    if unknown:
        raise ValueError(f"sample {key!r}: no member kind for field(s) {', '.join(sorted(unknown))}")
    members = []
    for kind in MEMBER_KINDS:
        value = record.get(kind.field)
        if value is None:
            continue
        for i, item in enumerate(value) if kind.numbered else ((None, value),):
            data = kind.encode(item)
            if data is not None:
                members.append((f"{key}.{kind.member_name(i)}", data))
    return members


def order_members(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """One sample's (name, bytes) members in the order `record_members` writes them (table order, numbered kinds
    by index): members taken from two records (what reprocess re-derives and what it carries over) come out as
    one record written anew would."""
    def place(member: tuple[str, bytes]) -> tuple[int, int]:
        kind = member_kind(member_suffix(member[0]))
        return MEMBER_KINDS.index(kind), kind.index(member[0].split(".", 1)[1]) if kind.numbered else 0

    return sorted(members, key=place)


def decode_member(suffix: str, data: bytes) -> Any:
    """Safe decode of one member by its kind (`MEMBER_KINDS`): json → dict, npy → array (no pickle), labels →
    list[int]; images and flac stay bytes (the consumer decodes them with PIL / PyAV, which parse only media)."""
    kind = member_kind(suffix)
    if kind is None:
        raise BadSample(f"member suffix {suffix!r} is not part of the cavmae sample schema")
    return kind.decode(data)


MAX_JSON_BYTES = 1 << 20
_NUMBER = (int, float)
# The type of each META_FIELDS entry a reader uses (None is allowed for all: older sets, audio- or video-only).
META_TYPES: dict[str, tuple[type, ...]] = {
    "video_id": (str,), "source": (str,), "duration_s": _NUMBER, "fps": _NUMBER, "audio_frames": (int,),
    "sample_rate": (int,), "has_audio": (bool,), "has_video": (bool,), "config_digest": (str,), "window": (int,),
    "clip_start_s": _NUMBER, "audio_start_s": _NUMBER,
}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def decode_meta(data: bytes) -> dict[str, Any]:
    """The `.json` member: a JSON object of at most MAX_JSON_BYTES whose fields have their schema types
    (`META_TYPES`; `labels` a list of strings, what the trainer maps through a label index; `frame_times_s` a
    list of numbers) and no NaN or Infinity; deep nesting is a BadSample, not a RecursionError."""
    if len(data) > MAX_JSON_BYTES:
        raise BadSample(f"json member of {len(data)} bytes (at most {MAX_JSON_BYTES})")
    try:
        meta = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise BadSample("json member is nested too deeply") from None
    except ValueError as exc:
        raise BadSample(f"json member is not valid JSON ({one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json member is a {type(meta).__name__}, not an object")
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise BadSample("json 'labels' is not a list of strings")
    times = meta.get("frame_times_s")
    if times is not None and not (isinstance(times, list) and all(_is_number(t) for t in times)):
        raise BadSample("json 'frame_times_s' is not a list of numbers")
    for name, types in META_TYPES.items():
        value = meta.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise BadSample(f"json {name!r} is a {type(value).__name__}, not {' or '.join(t.__name__ for t in types)}")
    return meta


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def decode_labels(data: bytes) -> list[int]:
    """The `.labels.txt` member: comma-separated non-negative class indices ("3,17"); empty for no label."""
    text = data.decode("ascii").strip()
    if not text:
        return []
    parts = text.split(",")
    if not all(p.strip().isdigit() and len(p.strip()) <= len(str(LABEL_INDEX_LIMIT - 1)) for p in parts):
        raise BadSample(f"labels.txt {text[:40]!r} is not comma-separated non-negative class indices")
    return [int(p) for p in parts]


FBANK_DTYPES = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))  # native byte order


def decode_fbank(data: bytes) -> np.ndarray:
    """The `.fbank.npy` member: an npy (`decode_npy`) that is 2-D float with rows and columns and finite values."""
    fbank = decode_npy(data)
    if fbank.ndim != 2 or fbank.dtype not in FBANK_DTYPES or 0 in fbank.shape:
        raise BadSample(f"fbank has shape {fbank.shape} and dtype {fbank.dtype}, expected 2-D float with rows")
    if not all_finite(fbank):
        raise BadSample("fbank holds NaN or infinite values")
    return fbank


def encode_labels(indices: list[int]) -> bytes | None:
    """Class indices as `.labels.txt` ("3,17"); no member for no label."""
    return ",".join(str(i) for i in indices).encode() if indices else None


def _as_bytes(data: bytes) -> bytes:
    return data


def _always(meta: dict[str, Any]) -> bool:
    return True


def _never(meta: dict[str, Any]) -> bool:
    return False


def _with_audio(meta: dict[str, Any]) -> bool:
    return meta.get("has_audio") is not False  # (a video-only clip has no fbank)


_NUMBER_IN = re.compile(r"\d+")


@dataclass(frozen=True)
class MemberKind:
    """One kind of sample member. `suffix` is what follows the key (a regular expression; `name` the suffix written,
    with `{}` for the index of a `numbered` kind such as the frames); `field` is the decoded sample's key for it (a
    list for a numbered kind, None when absent); `required` says, from the sample's json, whether the sample must
    hold one; `decode` is its safe decoder (bytes in; it raises BadSample or ValueError for bytes outside the schema;
    media stays bytes for PIL / PyAV) and `encode` its writer (value → bytes, None for no member); `produce`, when
    given, makes its value at ingest from the decoded clip and the json (the built-in kinds are the pipeline's
    own: `preprocess.sample.iter_samples` makes them). The position in `MEMBER_KINDS` is the kind's place in a
    sample (`record_members`)."""

    suffix: str
    name: str
    field: str
    decode: Callable[[bytes], Any]
    encode: Callable[[Any], bytes | None] = _as_bytes
    required: Callable[[dict[str, Any]], bool] = _never
    numbered: bool = False
    produce: Callable[[Any, dict[str, Any]], Any] | None = None  # ingest's producer: (decoded clip, json) → value

    def member_name(self, index: int | None = None) -> str:
        return self.name.format(index) if self.numbered else self.name

    def index(self, suffix: str) -> int:
        """The index in a numbered kind's suffix ('frame3.jpg' → 3)."""
        return _index_in(suffix)


@functools.lru_cache(maxsize=4096)  # (the same few frame suffixes in every sample)
def _index_in(suffix: str) -> int:
    return int(_NUMBER_IN.search(suffix).group())


def _encode_fbank(fbank: np.ndarray) -> bytes:
    return encode_npy(fbank.astype(np.float16))


# The one table of member kinds: every reader takes exactly these (`shards.samples` groups by it), decodes them here
# (`shards.reader.decode_sample`), writes them here (`record_members`), and reprocess carries over every kind it
# does not re-derive. Adding a kind is one entry plus its producer and its consumer (tests/test_record.py).
MEMBER_KINDS = (
    MemberKind("json", "json", "meta", decode_meta, encode_json, required=_always),
    MemberKind("fbank.npy", "fbank.npy", "fbank", decode_fbank, _encode_fbank, required=_with_audio),
    MemberKind(r"frame\d{1,3}\.jpg", "frame{}.jpg", "frames", _as_bytes, numbered=True),
    MemberKind("flac", "flac", "flac", _as_bytes),
    MemberKind("labels.txt", "labels.txt", "labels", decode_labels, encode_labels),
)
_KINDS = re.compile("|".join(f"({k.suffix})" for k in MEMBER_KINDS))


def add_member_kind(kind: MemberKind) -> None:
    """Append `kind` to `MEMBER_KINDS` (a kind defined outside this module: a test's, a project's own; it must be
    added in every process that reads or writes it, Ray workers included: `worker_process_setup_hook`). A kind of
    the toolkit is an entry of the table above."""
    global MEMBER_KINDS, _KINDS
    if any(k.field == kind.field or k.suffix == kind.suffix for k in MEMBER_KINDS):
        if kind in MEMBER_KINDS:
            return
        raise ValueError(f"member kind {kind.suffix!r} ({kind.field}) clashes with one of the table")
    MEMBER_KINDS = (*MEMBER_KINDS, kind)
    _KINDS = re.compile("|".join(f"({k.suffix})" for k in MEMBER_KINDS))
    member_kind.cache_clear()


@functools.lru_cache(maxsize=4096)  # a handful of suffixes repeat in every sample: one dict lookup per member
def member_kind(suffix: str) -> MemberKind | None:
    """The kind of a member suffix ('frame3.jpg' → the frame kind), or None for a suffix outside the schema."""
    match = _KINDS.fullmatch(suffix)
    return MEMBER_KINDS[match.lastindex - 1] if match else None
