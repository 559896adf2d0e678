"""CAV-MAE models, the streaming data pipeline, training loops and the `cavmae-train` CLI."""

from cavmae.train import settings  # noqa: F401  (registers the sections train/ owns with shards.settings)
