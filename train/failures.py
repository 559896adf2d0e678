"""The failure policy of the sample streams: a sample or shard that cannot be decoded is skipped, logged and
counted, never replaced.

A sample that fails to decode (bad JPEG, bad npy, a member outside the schema, a truncated shard) is skipped and
counted; the count rides along in each batch (`batch["skipped"]`) so the trainer can report it. We never replace it
with a constant tensor as the official loader does (that silently trains on garbage, issue #5). `Failures` is that
count for one stream stage (`train.loaders.decoded_samples`, `train.transform.Transform`), and gives up with
NoSamples on a set where nothing decodes.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from cavmae.shards.errors import NoSamples
from cavmae.shards.schema import one_line

log = logging.getLogger(__name__)


def shard_list(urls: Iterable[str], shown: int = 3) -> str:
    """'a.tar, b.tar, c.tar and 7 more' for one-line messages."""
    names = list(urls)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


MAX_FAILURES = 1000  # consecutive skips (samples or shards) before a stream gives up: a set where nothing decodes


class Failures:
    """Consecutive skips of one stream stage: each is logged with its key and shard (so the skip counter equals
    the warnings), and MAX_FAILURES in a row without one good sample raise NoSamples instead of looping forever
    over a set in which nothing decodes (random bytes, a non-tar file, every sample outside the config)."""

    def __init__(self) -> None:
        self.skipped = 0  # since the last sample handed on (rides along in the batches)
        self.in_a_row = 0
        self.urls: dict[str, None] = {}

    def skip(self, url: str, what: str, reason: Any) -> None:
        self.skipped += 1
        self.in_a_row += 1
        self.urls[url] = None
        log.warning("skipping %s of %s: %s", what, url, one_line(reason))
        if self.in_a_row >= MAX_FAILURES:
            raise NoSamples(f"no sample decoded in {self.in_a_row} tries in a row (shards: {shard_list(self.urls)}; "
                            f"last: {one_line(reason)})")

    def passed(self) -> int:
        """A good sample: the skips since the previous one (and reset)."""
        count, self.skipped, self.in_a_row, self.urls = self.skipped, 0, 0, {}
        return count
