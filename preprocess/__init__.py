"""Raw videos to samples: decoding, features, the ingest and reprocess jobs, and the `cavmae-prep` CLI."""

from cavmae.preprocess import settings  # noqa: F401  (registers the sections preprocess/ owns with shards.settings)
