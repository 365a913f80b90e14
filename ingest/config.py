"""IngestConfig: every option of the download stage, with img2dataset's names.

An existing img2dataset command line works unchanged: the option names and their
meanings follow img2dataset's ``download()`` (list options also take its
``'["a","b"]'`` spelling). Options of our own (network safety, byte caps, per-host
limits) use the same style. Where we differ, on purpose:

* defaults: ``output_format`` webdataset (what filter/ and shards/ read; img2dataset:
  files), ``distributor`` auto (local processes, or Ray given a cluster address;
  img2dataset: multiprocessing, accepted here as processes), ``thread_count`` 64 async
  requests per shard (img2dataset: 256 threads), ``processes_count`` 0 = one per CPU
  (img2dataset: 1);
* where shards run is ``core.executor.Execution``, the options every stage shares
  (``distributor``, ``workers``, ``max_retries``, ``max_in_flight``, ``ray_address``,
  ``progress``); img2dataset's names for them are accepted too (``ALIASES``):
  ``processes_count`` = workers, ``max_shard_retry`` = max_retries,
  ``max_shards_in_flight`` = max_in_flight;
* ``compute_hash``: sha256 is always stored (exact dedupe in filter/ needs it); md5
  or sha512 adds a column of that name, as img2dataset's does;
* ``enable_wandb`` is accepted so command lines run, but nothing is sent anywhere;
  ``pyspark`` is refused with a pointer to ray.

And one addition, on by default because downloading is the expensive step: rows
not worth their bytes are recorded before any request (``ingest.plan``): a repeated
(URL, caption) pair across the whole job, and captions that are missing, boilerplate
or short. ``--dedupe_url_caption false --min_caption_chars 0 --min_caption_words 0
--reject_boilerplate_captions false`` downloads every row, as img2dataset does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from core.config import ConfigError, at_least, one_of, option, problem, require
from core.executor import Execution
from core.layout import POOL_SCHEMA
from core.shard_writer import OUTPUT_FORMATS
from ingest.fetcher import FetchConfig
from ingest.dedupe import ROWS_PER_PARTITION
from ingest.plan import PlanRules
from ingest.reader import INPUT_FORMATS
from ingest.resizer import ENCODE_FORMATS, ResizeConfig
from ingest.safety import NetworkPolicy

HASHES = ("sha256", "md5", "sha512", "none")
_NOT_OUTPUT = {f.name for f in dataclasses.fields(Execution)} | {
    "url_list", "output_folder", "incremental_mode", "enable_wandb", "thread_count", "per_host_limit",
    "plan_rows_per_partition"}
_GZ_FORMATS = tuple(f"{f}.gz" for f in INPUT_FORMATS if f != "parquet")


@dataclass
class IngestConfig(Execution):
    # img2dataset's names for the shared execution options: its command lines run unchanged
    ALIASES: ClassVar[dict[str, str]] = {
        "processes_count": "workers", "max_shard_retry": "max_retries", "max_shards_in_flight": "max_in_flight",
    }

    url_list: str = option("", "input file, or folder of files, of URLs (local or s3://)")
    output_folder: str = option("", "where shards go (local or s3://); created if missing")
    input_format: str = option(
        "txt",
        "txt (one URL a line), csv, tsv (with a header row), json (an array of objects, or JSON lines), "
        "jsonl, parquet; txt/csv/tsv/json/jsonl may end in .gz",
    )
    url_col: str = option("url", "column holding the image URL (csv, tsv, json, jsonl, parquet)")
    caption_col: str | None = option(None, "column holding the caption (none: no captions)")
    save_additional_columns: list[str] = option(
        [], "extra input columns copied to each sample's parquet row and .json, e.g. '[\"license\",\"NSFW\"]' or a,b"
    )
    # -- ours (img2dataset has none of these): cheap rejections before any download ---------
    dedupe_url_caption: bool = option(
        True,
        "ours: a row whose (normalised URL, caption) pair appeared earlier in the job, in any input file, is "
        "recorded as dup_url and not downloaded; false: download every row, as img2dataset does",
    )
    min_caption_chars: int = option(
        5, "ours: rows whose caption has fewer characters are recorded as caption_short (empty: caption_missing) "
        "and not downloaded; only with --caption_col"
    )
    min_caption_words: int = option(2, "ours: likewise for fewer words (in unspaced scripts, characters)")
    reject_boilerplate_captions: bool = option(
        True,
        "ours: rows whose caption is a file name or a generic word ('IMG_1234.JPG', 'image', 'untitled') are "
        "recorded as caption_boilerplate and not downloaded. With --min_caption_chars 0 --min_caption_words 0 "
        "and this false, captions are not checked at all, as in img2dataset",
    )
    plan_rows_per_partition: int = option(
        ROWS_PER_PARTITION,
        "ours: the dedupe runs before download as a sort over partitions of the rows' fingerprints, each of "
        "about this many rows (~60 bytes each in its worker); the partitions change nothing in the result, "
        "only how the work is split",
    )
    output_format: str = option(
        "webdataset",
        "webdataset: {shard}.tar of {key}.jpg/.txt/.json; files: a folder {shard}/ of the same files; "
        "parquet: images in a 'jpg' column of {shard}.parquet. Every format also writes {shard}.parquet "
        "(one row per input row, failures included) and {shard}_stats.json, last, as the commit marker",
    )
    image_size: int = option(256, "target size in pixels (the meaning depends on resize_mode)")
    resize_mode: str = option(
        "border",
        "no: keep the size; border: fit inside image_size x image_size, pad with white; keep_ratio: "
        "short side to image_size; keep_ratio_largest: long side to image_size; center_crop: short side "
        "to image_size, then crop the centre square",
    )
    resize_only_if_bigger: bool = option(False, "never upscale: resize only images larger than the target")
    encode_format: str = option("jpg", f"image encoding of the output: one of {', '.join(ENCODE_FORMATS)}")
    encode_quality: int = option(95, "encoder quality for jpg and webp, 1..100")
    min_image_size: int = option(0, "refuse images whose short side is smaller, in pixels (0: no minimum)")
    max_image_area: float = option(float("inf"), "refuse images with more pixels (width x height) than this")
    max_aspect_ratio: float = option(float("inf"), "refuse images whose long side / short side is larger than this")
    number_sample_per_shard: int = option(10000, "input rows per shard (the unit of work, of retry and of resume)")
    thread_count: int = option(64, "concurrent downloads within each shard (async requests, not OS threads)")
    per_host_limit: int = option(16, "concurrent connections to one host, per shard")
    timeout: float = option(10.0, "overall deadline per request in seconds: connection, redirects and body included")
    retries: int = option(0, "retries per sample, for retryable failures only (timeouts, resets, 429, 5xx)")
    max_bytes: int = option(20_000_000, "refuse bodies larger than this many bytes (checked while reading)")
    max_pixels: int = option(178_956_970, "refuse images announcing more pixels than this, from the header, before decoding")
    decode_margin: float = option(
        1.5,
        "decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) giving at least this many times the output "
        "size: 1 is fastest but loses fine detail on photographs (below 35 dB PSNR against a full decode); "
        "1.5 keeps it (≈ +0.4 ms per web photo); 0 always decodes at full size",
    )
    max_redirects: int = option(5, "redirects followed per request; more is too_many_redirects")
    allow_networks: list[str] = option(
        [], "CIDRs exempt from the private/loopback/link-local/metadata block, e.g. 127.0.0.1/32 (comma-separated)"
    )
    user_agent_token: str | None = option(None, "your contact or project name, added to the User-Agent")
    disallowed_header_directives: list[str] = option(
        ["noai", "noimageai", "noindex", "noimageindex"],
        "X-Robots-Tag directives that opt a URL out (checked before the body is read); '[]' honours none",
    )
    compute_hash: str = option(
        "sha256",
        "hash of the downloaded bytes: sha256, md5, sha512 or none. sha256 is always stored (the filter's "
        "exact dedupe needs it); md5 or sha512 adds a column of that name, as img2dataset does",
    )
    incremental_mode: str = option(
        "incremental", "incremental: skip shards already committed (resume); overwrite: delete the output first"
    )
    enable_wandb: bool = option(False, "accepted for img2dataset compatibility; Weights & Biases logging is not supported")

    def __post_init__(self) -> None:
        if not self.url_list:
            problem("url_list: required (a file or folder of URL lists)")
        require(self, "output_folder")
        one_of(self, "input_format", INPUT_FORMATS + _GZ_FORMATS)
        one_of(self, "output_format", OUTPUT_FORMATS)
        if self.distributor == "pyspark":
            problem("distributor='pyspark': not supported; use ray (a cluster via --ray_address)")
        super().__post_init__()
        if self.incremental_mode not in ("incremental", "overwrite"):
            problem(f"incremental_mode={self.incremental_mode!r}: choose incremental or overwrite")
        self.compute_hash = (self.compute_hash or "none").lower()
        one_of(self, "compute_hash", HASHES)
        clashes = sorted(set(self.save_additional_columns) & set(POOL_SCHEMA.names + self.hash_columns()))
        if clashes:
            problem(
                f"save_additional_columns: {clashes} clash with the pool's own columns "
                f"({', '.join(POOL_SCHEMA.names)}); rename them in the input"
            )
        at_least(self, 1, "number_sample_per_shard", "plan_rows_per_partition", "thread_count", "per_host_limit",
                 "max_bytes", "max_pixels")
        at_least(self, 0, "retries", "max_redirects", "min_image_size", "min_caption_chars", "min_caption_words")
        if not self.timeout > 0:
            problem(f"timeout={self.timeout}: must be a positive number of seconds")
        # Build the parts once so their own checks run now, before any work.
        self.resize_config()
        self.network_policy()

    def output_settings(self) -> dict:
        """The options a shard's contents depend on (not where, how fast or how many at once it runs)."""
        from core.config import to_dict

        return {k: v for k, v in to_dict(self).items() if k not in _NOT_OUTPUT}

    def hash_columns(self) -> list[str]:
        """Extra hash columns besides sha256 (img2dataset names the column after the hash)."""
        return [self.compute_hash] if self.compute_hash in ("md5", "sha512") else []

    def extra_columns(self) -> list[str]:
        """Columns after the pool's own: the input's saved columns, then extra hashes."""
        return list(self.save_additional_columns) + self.hash_columns()

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
                decode_margin=self.decode_margin,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def network_policy(self) -> NetworkPolicy:
        try:
            return NetworkPolicy.from_cidrs(self.allow_networks)
        except ValueError as exc:
            raise ConfigError(f"allow_networks: {exc}") from None

    def plan_rules(self) -> PlanRules:
        """What is checked before download; captions only when the input has them."""
        return PlanRules(
            dedupe_url_caption=self.dedupe_url_caption,
            check_captions=self.caption_col is not None
            and (self.min_caption_chars > 0 or self.min_caption_words > 0 or self.reject_boilerplate_captions),
            min_caption_chars=self.min_caption_chars,
            min_caption_words=self.min_caption_words,
            reject_boilerplate_captions=self.reject_boilerplate_captions,
        )

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
