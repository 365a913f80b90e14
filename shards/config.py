"""ShardsConfig: turning a pool and its decisions into train shards."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, option


@dataclass
class ShardsConfig:
    pool: str = option("", "pool folder written by ingest (local or s3://)")
    decisions: str = option("", "decisions folder written by filter")
    output_folder: str = option("", "where train shards, manifest.json and the report go")
    samples_per_shard: int = option(1000, "samples per train shard (the last one may hold fewer)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("pool", "decisions", "output_folder"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard={self.samples_per_shard}: must be a positive integer")
