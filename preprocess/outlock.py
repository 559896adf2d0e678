"""One job at a time per output folder.

Two runs into one `--out` would delete each other's temporary shards (each cleans up what a killed run left)
and race on the plan and the manifest. A local folder is locked with `flock` on the folder itself: no lock
file is left behind, and the kernel releases the lock when the holder dies (kill -9 included), so a stale lock
never blocks a resume. Object stores have no such lock: one job per URI is the user's to keep.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

from cavmae.shards.config import ConfigError
from cavmae.shards.store import Store


class OutputBusy(ConfigError):
    """Another run holds the output folder."""


@contextmanager
def output_lock(store: Store) -> Iterator[None]:
    if not store.local:
        yield
        return
    fd = os.open(store.path(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{store.uri()}: another cavmae-prep run is writing into this folder; wait for it "
                             f"to end (re-running then resumes) or use another --out") from None
        yield
    finally:
        os.close(fd)
