"""How a command-line process ends once its work is done.

A CLI's work leaves native thread pools behind that Python does not own: pyarrow's I/O and CPU pools (a parquet
read, a filesystem listing), jemalloc's background thread, torch's intra-op pool, Ray's core worker threads.
When the interpreter then finalises, C++ static destructors tear those pools down while their threads may still
be running, and a `std::thread` destroyed while joinable calls `std::terminate`: the process prints "terminate
called without an active exception" and dies by SIGABRT *after* it printed its result (measured: `cavmae-train
order`, about one run in ten under load; apache/arrow#34314 and #39862 describe the same race).

`finish` ends the process without that teardown: it first shuts down what does hold state worth a clean end
(Ray, which would otherwise leave its driver registered on the cluster; logging handlers) and flushes stdout and
stderr, then leaves with `os._exit`. Everything a command writes (shards, manifests, pictures, checkpoints,
JSON) is closed by the command itself before it returns, so nothing that matters waits for finalisation. Only
the process entry points call it (`python -m ...`, the console scripts); `main(argv)` still returns its status,
so tests call it in-process.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def finish(code: int) -> NoReturn:
    """Flush, shut down Ray if this process started or joined it, and exit with `code` (no interpreter teardown)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
