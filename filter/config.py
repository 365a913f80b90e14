"""FilterConfig: every threshold of the decision stage, with its default."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, option


@dataclass
class FilterConfig:
    pool: str = option("", "pool folder written by ingest (local or s3://)")
    output_folder: str = option("", "where decisions go (local or s3://)")
    dedupe_url: bool = option(True, "reject a URL seen earlier in the pool (after normalisation)")
    dedupe_exact: bool = option(True, "reject image bytes (sha256) seen earlier in the pool")
    min_image_size: int = option(64, "reject images whose original short side is smaller")
    max_aspect_ratio: float = option(3.0, "reject images more elongated than this (long / short side)")
    min_caption_chars: int = option(5, "reject captions with fewer characters")
    min_caption_words: int = option(2, "reject captions with fewer words")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not self.pool:
            raise ConfigError("pool: required (the folder ingest wrote)")
        if not self.output_folder:
            raise ConfigError("output_folder: required")
        for name in ("min_image_size", "min_caption_chars", "min_caption_words"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be zero or more")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError(f"max_aspect_ratio={self.max_aspect_ratio}: must be at least 1")
