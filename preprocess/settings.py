"""The settings `preprocess/` owns: where and how its jobs run (the `ray:` section of pipeline.yaml). Registered with
`shards.settings` by `register_sections()`, which `cavmae-prep` (and `cavmae`) call first thing and a Ray task calls
for itself, never by importing this module: a process checks what its entry registered. A shard folder's frozen copy
of the section is a record, never a say in where a job runs."""

from __future__ import annotations

from dataclasses import dataclass

from cavmae.shards.settings import register, setting


@dataclass
class Ray:
    """Where and how ingest runs."""
    address: str | None = setting(None, "null: start a local Ray; or host:6379 of a `ray start --head` / auto / "
                                  "ray://host:10001 (RAY_ADDRESS and --address also work; token auth: see "
                                  "docs/cluster.md)")
    workers: int = setting(0, "local Ray CPUs; 0 = all cores", min=0, max=100_000)
    num_cpus_per_task: int = setting(1, min=1, max=1024)
    max_retries: int = setting(3, min=0, max=100)
    videos_per_task: int = setting(4, "work unit of ingest and reprocess: a few videos of one shard (shards stay "
                                   "the same bytes whatever this is); small units keep every core busy and make the "
                                   "job's tail short", min=1, max=100_000)
    video_timeout_s: int = setting(30, "an input that takes longer than this (wall time) becomes a failed row "
                                   "\"timed out after N s\" and its worker is replaced (a 10 s clip takes 0.1-0.3 s; "
                                   "raise it for long videos in clip.mode: windows, 0.1-0.3 s per window)", min=1,
                                   max=86_400)


def register_sections() -> None:
    """Register `ray` with `shards.settings` (again: a no-op)."""
    register({"ray": Ray})
