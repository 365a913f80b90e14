"""IngestConfig: every option of the download stage, with img2dataset's names.

An existing img2dataset command line works unchanged: the option names and their
meanings follow img2dataset's ``download()``. Options of our own (network safety,
byte caps, per-host limits) use the same style.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.config import ConfigError, option
from ingest.fetcher import FetchConfig
from ingest.resizer import ENCODE_FORMATS, RESIZE_MODES, ResizeConfig
from ingest.safety import NetworkPolicy

INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "txt")
DISTRIBUTORS = ("ray", "inline")


@dataclass
class IngestConfig:
    url_list: str = option("", "input file or folder of files (local or s3://)")
    output_folder: str = option("", "where pool shards go (local or s3://)")
    input_format: str = option("txt", f"one of {', '.join(INPUT_FORMATS)} (a .gz suffix is also read)")
    url_col: str = option("url", "column holding the image URL")
    caption_col: str | None = option(None, "column holding the caption (none: no captions)")
    save_additional_columns: list[str] = option([], "extra input columns to keep in parquet and json")
    output_format: str = option("webdataset", "webdataset (tar + parquet + stats per shard)")
    image_size: int = option(256, "target size in pixels")
    resize_mode: str = option("border", f"one of {', '.join(RESIZE_MODES)}")
    resize_only_if_bigger: bool = option(False, "never upscale")
    encode_format: str = option("jpg", f"one of {', '.join(ENCODE_FORMATS)}")
    encode_quality: int = option(95, "encoder quality, 1..100")
    min_image_size: int = option(0, "refuse images whose short side is smaller (0: no minimum)")
    max_image_area: float = option(float("inf"), "refuse images with more pixels than this")
    max_aspect_ratio: float = option(float("inf"), "refuse images more elongated than this")
    number_sample_per_shard: int = option(10000, "input rows per shard (the unit of work and of resume)")
    processes_count: int = option(0, "shards processed at once (0: one per CPU of the Ray cluster)")
    thread_count: int = option(64, "concurrent downloads per shard")
    per_host_limit: int = option(16, "concurrent connections per host, per shard worker")
    timeout: float = option(10.0, "overall deadline per request in seconds, redirects and body included")
    retries: int = option(0, "retries per sample, for retryable failures only (timeouts, 429, 5xx, resets)")
    max_bytes: int = option(20_000_000, "refuse bodies larger than this many bytes")
    max_pixels: int = option(178_956_970, "refuse images announcing more pixels than this (from the header)")
    max_redirects: int = option(5, "redirects followed per request")
    allow_networks: list[str] = option([], "CIDRs exempt from the private-address block, e.g. 127.0.0.1/32")
    user_agent_token: str | None = option(None, "your contact or project name, added to the User-Agent")
    disallowed_header_directives: list[str] = option(
        ["noai", "noimageai", "noindex", "noimageindex"], "X-Robots-Tag directives that opt a URL out"
    )
    compute_hash: str = option("sha256", "hash of the downloaded bytes (sha256)")
    incremental_mode: str = option("incremental", "incremental: skip committed shards; overwrite: start over")
    distributor: str = option("ray", f"one of {', '.join(DISTRIBUTORS)} (inline: this process, for debugging)")
    ray_address: str | None = option(None, "Ray cluster address (none: RAY_ADDRESS, else a local instance)")
    max_shards_in_flight: int = option(0, "shards submitted but unfinished (0: 2 x processes_count)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not self.url_list:
            raise ConfigError("url_list: required (a file or folder of URL lists)")
        if not self.output_folder:
            raise ConfigError("output_folder: required")
        fmt = self.input_format.removesuffix(".gz")
        if fmt not in INPUT_FORMATS:
            raise ConfigError(f"input_format={self.input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
        if self.output_format != "webdataset":
            raise ConfigError(f"output_format={self.output_format!r}: only webdataset is supported so far")
        if self.distributor not in DISTRIBUTORS:
            raise ConfigError(f"distributor={self.distributor!r}: choose one of {', '.join(DISTRIBUTORS)}")
        if self.incremental_mode not in ("incremental", "overwrite"):
            raise ConfigError(f"incremental_mode={self.incremental_mode!r}: choose incremental or overwrite")
        if self.compute_hash != "sha256":
            raise ConfigError(f"compute_hash={self.compute_hash!r}: only sha256 is supported")
        for name in ("number_sample_per_shard", "thread_count", "per_host_limit", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive integer")
        for name in ("processes_count", "retries", "max_redirects", "max_shards_in_flight", "min_image_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be zero or more")
        if not self.timeout > 0:
            raise ConfigError(f"timeout={self.timeout}: must be a positive number of seconds")
        # Build the parts once so their own checks run now, before any work.
        self.resize_config()
        self.network_policy()

    def resize_config(self) -> ResizeConfig:
        try:
            return ResizeConfig(
                image_size=self.image_size,
                resize_mode=self.resize_mode,
                resize_only_if_bigger=self.resize_only_if_bigger,
                encode_format=self.encode_format,
                encode_quality=self.encode_quality,
                min_image_size=self.min_image_size,
                max_image_area=self.max_image_area,
                max_aspect_ratio=self.max_aspect_ratio,
                max_pixels=self.max_pixels,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def network_policy(self) -> NetworkPolicy:
        try:
            return NetworkPolicy.from_cidrs(self.allow_networks)
        except ValueError as exc:
            raise ConfigError(f"allow_networks: {exc}") from None

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(
            timeout=self.timeout,
            retries=self.retries,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            concurrency=self.thread_count,
            per_host_limit=self.per_host_limit,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=tuple(d.lower() for d in self.disallowed_header_directives),
        )

    def replace(self, **changes) -> "IngestConfig":
        return dataclasses.replace(self, **changes)
