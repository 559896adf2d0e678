import pytest


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory):
    """One folder of generated clips per test session (tests/clips.py caches by name inside it)."""
    return tmp_path_factory.mktemp("clips")
