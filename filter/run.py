"""The filter job: pool metadata → decisions, one parquet per pool shard.

Reads each committed pool shard's parquet in key order (one file at a time, so
memory holds one shard plus the dedupe sets), decides every row with
``filter.rules.decide``, and writes ``{shard}.parquet`` with columns
(key, keep, reason) — every row of the pool gets exactly one decision. Counts per
reason go to ``_filter_stats.json``. Deterministic: the same pool and config give
the same decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from core import storage
from core.config import to_dict
from core.layout import committed_shards, shard_name
from filter.config import FilterConfig
from filter.rules import Deduper, decide

DECISION_SCHEMA = pa.schema([("key", pa.string()), ("keep", pa.bool_()), ("reason", pa.string())])
STATS_FILE = "_filter_stats.json"
_COLUMNS = ["key", "url", "caption", "status", "reason", "width", "height", "original_width", "original_height", "sha256"]


@dataclass
class FilterSummary:
    rows: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    duration: float = 0.0


def read_pool_shard(pool: str, shard_id: int) -> list[dict]:
    path = storage.join(pool, f"{shard_name(shard_id)}.parquet")
    with storage.open_file(path) as handle:
        table = pq.read_table(handle, columns=_COLUMNS)
    return table.sort_by("key").to_pylist()


def run_filter(cfg: FilterConfig) -> FilterSummary:
    start = time.time()
    shard_ids = sorted(committed_shards(cfg.pool))
    if not shard_ids:
        raise SystemExit(f"filter: no committed pool shards in {cfg.pool!r} (run ingest first)")
    storage.makedirs(cfg.output_folder)
    seen = Deduper()
    summary = FilterSummary()
    for shard_id in tqdm(shard_ids, desc="filter", unit="shard", disable=not cfg.progress):
        keys, keeps, reasons = [], [], []
        for row in read_pool_shard(cfg.pool, shard_id):
            reason = decide(row, cfg, seen)
            keys.append(row["key"])
            keeps.append(reason is None)
            reasons.append(reason.value if reason else None)
            summary.rows += 1
            if reason is None:
                summary.kept += 1
            else:
                summary.reasons[reason.value] = summary.reasons.get(reason.value, 0) + 1
        table = pa.Table.from_arrays([pa.array(keys), pa.array(keeps), pa.array(reasons, pa.string())],
                                     schema=DECISION_SCHEMA)
        with storage.atomic_write(storage.join(cfg.output_folder, f"{shard_name(shard_id)}.parquet")) as handle:
            pq.write_table(table, handle, compression="zstd")
        summary.shards += 1
    summary.duration = time.time() - start
    storage.write_json(
        storage.join(cfg.output_folder, STATS_FILE),
        {
            "rows": summary.rows,
            "kept": summary.kept,
            "rejected": summary.rows - summary.kept,
            "reasons": dict(sorted(summary.reasons.items())),
            "pool_shards": [shard_name(i) for i in shard_ids],
            "config": to_dict(cfg),
            "duration": summary.duration,
        },
    )
    return summary


def load_decisions(decisions: str, shard_id: int) -> dict[str, bool]:
    """key → keep for one pool shard."""
    with storage.open_file(storage.join(decisions, f"{shard_name(shard_id)}.parquet")) as handle:
        table = pq.read_table(handle, columns=["key", "keep"])
    return dict(zip(table.column("key").to_pylist(), table.column("keep").to_pylist()))



