"""CAV-MAE models, the streaming data pipeline, training loops and the `cavmae-train` CLI."""
