"""The typed configs of shards/: resharding, verifying, reporting."""

from __future__ import annotations

from dataclasses import dataclass

from core.cluster import DISTRIBUTORS
from core.config import at_least, one_of, option, require


@dataclass
class ShardsConfig:
    """``python -m shards``: pool + decisions → train shards, manifest.json (+ the report)."""

    pool: str = option("", "pool folder written by ingest (local or s3://)")
    decisions: str = option("", "decisions folder written by filter")
    output_folder: str = option("", "where train shards, manifest.json and the report go")
    samples_per_shard: int = option(1000, "samples per train shard (the last one may hold fewer)")
    mix_window: int = option(16, "pool shards whose samples are interleaved into the same train shards "
                                 "(more: better mixed, more pool shards open per task)")
    seed: int = option(0, "seed of the pool-shard order and of the interleaving (same seed, same shards)")
    distributor: str = option("ray", "ray: tasks on a local Ray instance or the cluster at ray_address / "
                                     "RAY_ADDRESS; inline: this process")
    ray_address: str = option("", "a Ray cluster to join (empty: RAY_ADDRESS, else a local instance)")
    workers: int = option(0, "parallel tasks (0: one per CPU of the Ray cluster)")
    max_shards_per_task: int = option(64, "train shards written by one task at most")
    overwrite: bool = option(False, "replace train shards of a different plan found in output_folder "
                                    "(otherwise the run stops and says what differs)")
    report: bool = option(True, "also write report.json, index.html and datasheet.md to output_folder")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        require(self, "pool", "decisions", "output_folder")
        at_least(self, 1, "samples_per_shard", "mix_window", "max_shards_per_task")
        at_least(self, 0, "workers", "seed")
        one_of(self, "distributor", DISTRIBUTORS)


@dataclass
class VerifyConfig:
    """``python -m shards.verify``: are the shards on storage the ones described?"""

    folder: str = option("", "folder of shards to check: train shards (with manifest.json), a pool, or an "
                             "img2dataset output folder (local or s3://)")
    workers: int = option(0, "shards checked in parallel (0: one per CPU)")
    output_json: str = option("", "also write the findings as JSON to this path")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        require(self, "folder")
        at_least(self, 0, "workers")


@dataclass
class ReportConfig:
    """``python -m shards.report``: statistics, plots and a datasheet, from metadata only."""

    pool: str = option("", "pool folder (ours, or an img2dataset output folder); local or s3://")
    decisions: str = option("", "decisions folder written by filter (optional: without it, kept = downloaded)")
    train: str = option("", "train shard folder with manifest.json (optional: adds the train shards)")
    output_folder: str = option("", "where report.json, index.html and datasheet.md go")
    dataset_name: str = option("", "name shown in the report and datasheet (default: the pool folder's name)")
    top_domains: int = option(50, "domains listed with their counts and success rates")
    workers: int = option(0, "pool shards summarised in parallel (0: one per CPU)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        require(self, "pool", "output_folder")
        at_least(self, 1, "top_domains")
        at_least(self, 0, "workers")
