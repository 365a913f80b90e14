"""The typed configs of shards/: resharding, verifying, reporting.

Each inherits ``core.executor.Execution``, the options every stage shares (where its
units run: ``--distributor``, ``--workers``, ``--max_retries``, ``--max_in_flight``,
``--ray_address``, ``--progress``): on one machine local processes, on a cluster Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import at_least, option, require
from core.executor import Execution


@dataclass
class ShardsConfig(Execution):
    """``python -m shards``: pool + decisions → train shards, manifest.json (+ the report)."""

    pool: str = option("", "pool folder written by ingest (local or s3://)")
    decisions: str = option("", "decisions folder written by filter")
    output_folder: str = option("", "where train shards, manifest.json and the report go")
    samples_per_shard: int = option(1000, "samples per train shard (the last one may hold fewer)")
    mix_window: int = option(16, "pool shards whose samples are interleaved into the same train shards "
                                 "(more: better mixed, more pool shards open per task)")
    seed: int = option(0, "seed of the pool-shard order and of the interleaving (same seed, same shards)")
    max_shards_per_task: int = option(64, "train shards written by one task at most")
    overwrite: bool = option(False, "replace train shards of a different plan found in output_folder "
                                    "(otherwise the run stops and says what differs)")
    report: bool = option(True, "also write report.json, index.html and datasheet.md to output_folder")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "pool", "decisions", "output_folder")
        at_least(self, 1, "samples_per_shard", "mix_window", "max_shards_per_task")
        at_least(self, 0, "seed")


@dataclass
class VerifyConfig(Execution):
    """``python -m shards.verify``: are the shards on storage the ones described?"""

    folder: str = option("", "folder of shards to check: train shards (with manifest.json), a pool, or an "
                             "img2dataset output folder (local or s3://)")
    output_json: str = option("", "also write the findings as JSON to this path")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "folder")


@dataclass
class ReportConfig(Execution):
    """``python -m shards.report``: statistics, plots and a datasheet, from metadata only."""

    pool: str = option("", "pool folder (ours, or an img2dataset output folder); local or s3://")
    decisions: str = option("", "decisions folder written by filter (optional: without it, kept = downloaded)")
    train: str = option("", "train shard folder with manifest.json (optional: adds the train shards)")
    output_folder: str = option("", "where report.json, index.html and datasheet.md go")
    dataset_name: str = option("", "name shown in the report and datasheet (default: the pool folder's name)")
    top_domains: int = option(50, "domains listed with their counts and success rates")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "pool", "output_folder")
        at_least(self, 1, "top_domains")
