"""The ingest job: URL list → pool shards, resumable.

First the repeats across the whole job are found (``ingest.dedupe``: one read of the
input, then a sort/partition pass on the executor's workers); then the input is read
again, each shard planned (``ingest.plan`` marks the rows not worth a download: those
repeats, junk captions), the ones already committed (their ``_stats.json`` exists)
skipped, and the rest handed, one unit per shard, to ``core.executor`` (local
processes, Ray tasks, or inline), whose progress bar shows samples/s and the success
rate while shards are still in flight.
Rerunning the same command after a crash redoes only the unfinished shards; a
half-written shard is never visible (see ``core.shard_writer``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from core import outcome, storage
from core.config import to_dict
from core.errors import DataError
from core.executor import Executor, progress_enabled, report
from core.layout import STATS_SUFFIX, committed_shards
from core.shard_writer import clean_stale_staging
from ingest.config import IngestConfig
from ingest.dedupe import PLAN_FOLDER, plan_duplicates
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
    storage_retries: int = 0  # object-storage requests retried in this run, its workers' included
    storage_retried_objects: int = 0

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
        with storage.open_file(path) as handle, storage.parquet_errors(path, "is --input_format right?"):
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def download_unit(cfg: IngestConfig, shard: ShardInput) -> dict[str, Any]:
    """One unit of the job: a shard, its running (rows, successes) reported to the progress bar."""
    stats = download_shard(shard, cfg, lambda _shard, rows, successes: report(rows, successes=successes))
    report(stats["count"], successes=stats["successes"])  # the final counts (running ones are throttled)
    return stats


def _success_rate(totals: dict[str, int]) -> dict[str, str]:
    if "successes" not in totals:
        return {}  # the planning passes
    return {"ok": f"{totals.get('successes', 0) / max(totals.get('items', 0), 1):.1%}"}


def example_error(folder: str, reason: str, files: int = 8) -> str | None:
    """The error message of one row refused for ``reason``, from the first pool parquets (for a hint)."""
    for path in [p for p in storage.list_files(folder, ".parquet")][:files]:
        with storage.open_file(path) as handle:
            table = pq.read_table(handle, columns=["reason", "error_message"], use_threads=False)
        for row_reason, message in zip(table.column("reason").to_pylist(), table.column("error_message").to_pylist()):
            if row_reason == reason and message:
                return message
    return None


def judge(cfg: IngestConfig, summary: IngestSummary) -> None:
    """Nothing downloaded: ``EmptyResult`` (exit 1); few downloaded: a warning (``core.outcome``)."""
    outcome.verdict("ingest", summary.count, summary.successes, summary.reasons, "downloaded",
                    partial(example_error, cfg.output_folder))


_START_OVER = ("to start over, rerun with --incremental_mode overwrite (deletes {folder}) or choose another "
               "--output_folder")


def _check_settings(cfg: IngestConfig, previous: dict[int, dict[str, Any]]) -> None:
    """Committed shards made with other settings are not reused silently: stop and say what differs."""
    now = cfg.output_settings()
    for shard_id, stats in previous.items():
        made_with = stats.get("settings")
        if made_with is None or made_with == now:
            continue  # a pool from before settings were recorded is taken as it is
        differs = [f"{k} ({made_with.get(k)!r} -> {v!r})" for k, v in now.items() if made_with.get(k) != v]
        raise DataError(f"{len(previous)} committed pool shards in {cfg.output_folder} (shard {shard_id:05d} first) were "
                        f"made with other settings: {'; '.join(differs)[:500]}; {_START_OVER.format(folder=cfg.output_folder)}")


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    start, retries = time.time(), storage.retry_counts()
    storage.refuse_overlap("output_folder", cfg.output_folder, {"url_list": cfg.url_list})
    input_files(cfg.url_list, cfg.input_format)  # every input checked before anything is deleted
    if cfg.incremental_mode == "overwrite" and storage.exists(cfg.output_folder):
        print(f"ingest: incremental_mode=overwrite: deleting {cfg.output_folder} "
              f"({storage.describe_contents(cfg.output_folder)})", file=sys.stderr)
        storage.clear_folder(cfg.output_folder)  # all but its lock (core.lock)
    storage.makedirs(cfg.output_folder)
    clean_stale_staging(cfg.output_folder)
    done = committed_shards(cfg.output_folder)
    previous = {i: storage.read_json(storage.join(cfg.output_folder, f"{i:05d}{STATS_SUFFIX}")) for i in sorted(done)}
    _check_settings(cfg, previous)
    summary = IngestSummary()

    if cfg.caption_col is None and cfg.input_format.removesuffix(".gz") != "txt":
        print(f"ingest: warning: no --caption_col: the samples get no caption (a CLIP model needs one, and the "
              f"filter rejects them as caption_missing); give --caption_col COLUMN", file=sys.stderr)
    if cfg.enable_wandb:
        print("ingest: enable_wandb is accepted but ignored; progress goes to stderr, stats to *_stats.json",
              file=sys.stderr)
    total = _total_rows(cfg) if progress_enabled(cfg.progress) else None
    executor = Executor(cfg, desc="ingest", unit="shard", item="sample", total=total, postfix=_success_rate)
    planner = Planner(cfg.plan_rules())

    def shards():
        return read_shards(cfg.url_list, cfg.input_format, cfg.url_col, cfg.caption_col, cfg.save_additional_columns,
                           cfg.number_sample_per_shard)

    def pending_shards():
        for shard in shards():
            # Committed shards took part in the dedupe pass (``plan_duplicates`` reads every shard), so
            # what later rows count as duplicates of does not depend on where the last run stopped;
            # marking them again would be wasted work.
            if shard.shard_id in done:
                stats = previous[shard.shard_id]
                made_from = stats.get("input_fingerprint")
                if made_from is not None and made_from != shard.fingerprint():
                    raise DataError(
                        f"pool shard {shard.shard_id:05d} in {cfg.output_folder} was downloaded from other input rows "
                        f"than url_list={cfg.url_list!r} holds now (the list changed, or another list was given); "
                        f"{_START_OVER.format(folder=cfg.output_folder)}")
                summary.shards_skipped += 1
                summary.add(stats)
                executor.skipped(stats["count"], successes=stats["successes"])
                continue
            yield planner.plan(shard, marks.rows(shard) if marks else ())

    plan_folder = storage.join(cfg.output_folder, PLAN_FOLDER)  # scratch: recomputed by any rerun
    try:
        with executor:
            marks = None
            if cfg.plan_rules().dedupe_url_caption:  # every shard, committed ones too (see above)
                marks = plan_duplicates(executor, cfg.output_folder, shards(), cfg.number_sample_per_shard,
                                        cfg.plan_rows_per_partition)
            for stats in executor.map(partial(download_unit, cfg), pending_shards()):
                summary.add(stats)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            storage.remove(plan_folder)  # also on a failed run (on a full disk its room is wanted back)
        raise
    storage.remove(plan_folder)
    summary.duration = time.time() - start
    inputs = [storage.fingerprint(p) for p in input_files(cfg.url_list, cfg.input_format)]
    summary.__dict__.update(storage.retries_since(retries))
    storage.write_json(
        storage.join(cfg.output_folder, SUMMARY_FILE),
        {**summary.__dict__, "config": to_dict(cfg),
         # what the pool was made from, for the train shards' manifest
         "inputs": inputs},
    )
    return summary
