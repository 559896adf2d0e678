"""The on-disk contract: config, sample schema, atomic shard writer, manifest, safe streaming reader."""
