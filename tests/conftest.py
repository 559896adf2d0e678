import pytest


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
