"""Read → decode → check → skip: the one loop of every reader of samples (training, evaluation, stats, inspect,
verify, predict, reprocess), so each catches the same errors and says the same thing about a sample it skips.

A sample is decoded by `shards.reader.decode_sample` (the schema, `shards.schema.MEMBER_KINDS`) and checked by a
validator (`shards.validate.check_sample` with the reader's `SampleSpec`, or a stricter check such as verify's).
One that fails is not yielded but handed, as a `Skip`, to the reader's skip policy (webdataset's `handler=`): it
logs, counts, collects or raises. So is the rest of a shard that cannot be read (a truncated or corrupt tar loses
that shard's rest only). What is caught is fixed here: `SAMPLE_ERRORS` from decoding and checking one sample (a
`BadSample`, or an image or FLAC library's own error on hostile bytes), `SHARD_ERRORS` from reading a shard.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .reader import decode_sample, open_stream
from .samples import Group, read_groups
from .schema import one_line

log = logging.getLogger(__name__)

SAMPLE_ERRORS = (ValueError, OSError)  # BadSample is a ValueError; PIL's UnidentifiedImageError an OSError
SHARD_ERRORS = (tarfile.TarError, OSError, ValueError)


@dataclass(frozen=True)
class Skip:
    """What a reader did not take: sample `key` of shard `url` (at `span`: offset, length), or with `key` None the
    rest of the shard, and why."""

    url: str
    key: str | None
    error: BaseException
    span: tuple[int, int] | None = None

    @property
    def what(self) -> str:
        return "the rest of the shard" if self.key is None else f"sample {self.key!r}"

    @property
    def reason(self) -> str:
        """The error as one line without the shard and sample it names (the `Skip` names them)."""
        text = one_line(self.error)
        for prefix in (f"{self.url}: {self.what}: ", f"{self.url}: "):
            text = text.removeprefix(prefix)
        return text

    def line(self) -> str:
        return f"{self.url}: {self.what}: {self.reason}"


def warn(skip: Skip) -> None:
    """The default skip policy: one warning naming the shard, the sample and the reason."""
    log.warning("skipped %s", skip.line())


Check = Callable[[dict[str, Any]], None]


def checked(raw: dict[str, Any], check: Check | None = None) -> dict[str, Any]:
    """One raw sample decoded (`decode_sample`) and checked (`check`, e.g. `SampleSpec(...).check`); raises one of
    `SAMPLE_ERRORS` for a sample that is not to be used."""
    sample = decode_sample(raw)
    if check is not None:
        check(sample)
    return sample


def checked_groups(url: str, check: Check | None = None,
                   on_skip: Callable[[Skip], None] = warn) -> Iterator[tuple[Group, dict[str, Any]]]:
    """(group, checked sample) of every sample of shard `url` in tar order (`shards.samples.read_groups`); what fails
    goes to `on_skip` instead (which may raise to stop: what it raises is never taken for a shard error)."""
    try:
        stream = open_stream(url)
    except SHARD_ERRORS as exc:
        on_skip(Skip(url, None, exc))
        return
    with stream:
        groups = read_groups(stream, url)
        while True:
            try:
                group = next(groups)
            except StopIteration:
                return
            except SHARD_ERRORS as exc:
                on_skip(Skip(url, None, exc))
                return
            try:
                sample = checked(group.raw(), check)
            except SAMPLE_ERRORS as exc:
                on_skip(Skip(url, group.key, exc, (group.start, group.end - group.start)))
                continue
            yield group, sample


def checked_samples(urls: Iterable[str], check: Check | None = None,
                    on_skip: Callable[[Skip], None] = warn) -> Iterator[dict[str, Any]]:
    """Every sample of the shards `urls`, in order, that decodes and passes `check`; see `checked_groups`."""
    for url in urls:
        for _, sample in checked_groups(url, check, on_skip):
            yield sample
