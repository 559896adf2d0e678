import contextlib
import os
import signal

import pytest

from cavmae.settings import register_sections
from tests import simd_off
from tests.clips import CLI_OFF

# A private Ray per test module: address="local" never joins a cluster some other process started with
# `ray start` (a bare ray.init() would).
LOCAL_RAY = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def pytest_configure(config):
    register_sections()  # the tests' entry: they use every owner's sections, as `cavmae` does
    config.addinivalue_line("markers", "pinned: the test compares bytes with pinned values, which must not depend on "
                                       "the machine: the ffmpeg CLI helpers of tests/clips.py refuse under it (use "
                                       "make_exact_clip), and what it pins is computed under tests/simd_off.py")
    if os.environ.get(simd_off.SESSION):  # python -m tests.simd_off: every CPU-dependent path off in this session
        unset = sorted(k for k, v in simd_off.ENV.items() if os.environ.get(k) != v)
        if unset:
            raise pytest.UsageError(f"{simd_off.SESSION} needs {', '.join(unset)} as tests/simd_off.py sets them")
        simd_off.force_ffmpeg_off()


@pytest.fixture(autouse=True)
def _no_ffmpeg_cli_when_pinned(request, monkeypatch):
    """A `pinned` test (and any process it starts) cannot make media with the machine's ffmpeg CLI."""
    if request.node.get_closest_marker("pinned"):
        monkeypatch.setenv(CLI_OFF, "1")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(**LOCAL_RAY, **(simd_off.RAY if os.environ.get(simd_off.SESSION) else {}))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    """One folder of generated clips per test session (tests/clips.py caches by name inside it)."""
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """The end-to-end training datasets (tests/train_fixtures.py::DATASETS), made once per session by the real
    ingest on a local Ray: a folder holding train/, val/, ddp/, pairs/, query/ and labels.csv."""
    from tests.train_fixtures import ingest_datasets

    return ingest_datasets(tmp_path_factory.mktemp("train_shards"))


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fail (TimeoutError) when the block runs longer than `seconds`: a hang is a failed test, not a stuck suite."""
    def expired(*_):
        raise TimeoutError(f"{what} did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
