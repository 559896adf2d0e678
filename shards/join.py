"""Joining something at an address the user (or an environment variable) named: a Ray cluster, a torch process
group. Both libraries can wait without end and log at length, and a join must fail in one line within a stated time.

- `within`: a port that accepts the connection and then never answers leaves both libraries waiting on a read
  they never time out (Ray retries its GCS connection for minutes, torch's TCPStore client blocks in its
  handshake). `within` runs the join in a daemon thread and stops waiting at the deadline: the caller reports the
  address and the limit in one line, and the process ends (`shards.process.finish`) with the thread still
  blocked, which holds nothing the command needs.
- `stderr_held`: their C++ cores log every retry (with stack traces) to file descriptor 2; it is held during the
  join, so that a join that fails is reported in one line.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class JoinTimeout(TimeoutError):
    """The join did not end within its limit (raised by `within`, not by the library)."""


def within(seconds: float, call: Callable[[], T], what: str) -> T:
    """`call()`'s result or exception if it ends within `seconds`; else JoinTimeout naming `what`."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # (handed to the waiting thread as it is)
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name=f"within {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise JoinTimeout(f"{what} did not finish within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@contextmanager
def stderr_held() -> Iterator[list[str]]:
    """Hold what is written to file descriptor 2 in the block; afterwards the list holds it as text."""
    text: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text.append(held.read().decode(errors="replace"))
