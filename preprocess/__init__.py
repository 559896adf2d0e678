"""Raw videos to samples: decoding, features, the ingest and reprocess jobs, and the `cavmae-prep` CLI."""
