"""The ingest job: URL list → pool shards, resumable.

Plan the shards from the input stream (``ingest.plan`` marks the rows not worth a
download: repeats across the whole job, junk captions), skip the ones already
committed (their ``_stats.json`` exists), and hand the rest, one unit per shard, to
``core.executor`` (local processes, Ray tasks, or inline), whose progress bar shows
samples/s and the success rate while shards are still in flight.
Rerunning the same command after a crash redoes only the unfinished shards; a
half-written shard is never visible (see ``core.shard_writer``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from core import storage
from core.config import to_dict
from core.executor import Executor, progress_enabled, report
from core.layout import STATS_SUFFIX, committed_shards
from core.shard_writer import clean_stale_staging
from ingest.config import IngestConfig
from ingest.plan import Planner
from ingest.reader import ShardInput, input_files, read_shards
from ingest.shard_worker import download_shard

SUMMARY_FILE = "_ingest_summary.json"


@dataclass
class IngestSummary:
    shards_total: int = 0
    shards_skipped: int = 0
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        self.shards_total += 1
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            setattr(self, name, getattr(self, name) + stats[name])
        for reason, n in stats.get("reasons", {}).items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def lines(self) -> list[str]:
        rate = self.successes / self.count if self.count else 0.0
        out = [
            f"{self.count} rows in {self.shards_total} shards ({self.shards_skipped} already done): "
            f"{self.successes} downloaded ({rate:.1%}), {self.failed_to_download} failed to download, "
            f"{self.failed_to_resize} failed to decode"
        ]
        out += [f"  {reason:<20} {n}" for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        return out


def _total_rows(cfg: IngestConfig) -> int | None:
    """Row count from parquet footers (cheap); unknown for text formats."""
    if cfg.input_format != "parquet":
        return None
    total = 0
    for path in input_files(cfg.url_list, cfg.input_format):
        with storage.open_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def download_unit(cfg: IngestConfig, shard: ShardInput) -> dict[str, Any]:
    """One unit of the job: a shard, its running (rows, successes) reported to the progress bar."""
    stats = download_shard(shard, cfg, lambda _shard, rows, successes: report(rows, successes=successes))
    report(stats["count"], successes=stats["successes"])  # the final counts (running ones are throttled)
    return stats


def _success_rate(totals: dict[str, int]) -> dict[str, str]:
    return {"ok": f"{totals.get('successes', 0) / max(totals.get('items', 0), 1):.1%}"}


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    start = time.time()
    if cfg.incremental_mode == "overwrite":
        storage.remove(cfg.output_folder)
    storage.makedirs(cfg.output_folder)
    clean_stale_staging(cfg.output_folder)
    done = committed_shards(cfg.output_folder)
    summary = IngestSummary()

    if cfg.enable_wandb:
        print("ingest: enable_wandb is accepted but ignored; progress goes to stderr, stats to *_stats.json",
              file=sys.stderr)
    total = _total_rows(cfg) if progress_enabled(cfg.progress) else None
    executor = Executor(cfg, desc="ingest", unit="shard", item="sample", total=total, postfix=_success_rate)
    planner = Planner(cfg.plan_rules())

    def pending_shards():
        for shard in read_shards(
            cfg.url_list,
            cfg.input_format,
            cfg.url_col,
            cfg.caption_col,
            cfg.save_additional_columns,
            cfg.number_sample_per_shard,
        ):
            # Committed shards are planned too, before they are skipped: what later rows
            # count as duplicates of must not depend on where the last run stopped.
            shard = planner.plan(shard)
            if shard.shard_id in done:
                stats = storage.read_json(storage.join(cfg.output_folder, f"{shard.shard_id:05d}{STATS_SUFFIX}"))
                summary.shards_skipped += 1
                summary.add(stats)
                executor.skipped(stats["count"], successes=stats["successes"])
                continue
            yield shard

    with executor:
        for stats in executor.map(partial(download_unit, cfg), pending_shards()):
            summary.add(stats)
    summary.duration = time.time() - start
    storage.write_json(
        storage.join(cfg.output_folder, SUMMARY_FILE),
        {**summary.__dict__, "config": to_dict(cfg),
         # what the pool was made from, for the train shards' manifest
         "inputs": [storage.fingerprint(p) for p in input_files(cfg.url_list, cfg.input_format)]},
    )
    return summary
