"""A small synthetic pool and its decisions, written with the real shard writer.

No network and no image decoding is involved in shards/, so the "images" are short
random byte strings; everything else (rows, reasons, domains, sizes, decisions with
dup_of, languages, CLIP scores) is shaped like a real pool so that every number of
the report has something to count. ``PoolSpec`` keeps the rows, for tests that count
independently.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from core.layout import sample_key
from core.shard_writer import ShardWriter
from filter.run import DECISION_SCHEMA

FAILURES = ["http_404", "timeout", "decode_error", "opt_out", "ssrf_blocked"]
BEFORE_DOWNLOAD = ["dup_url", "caption_short"]
REJECTIONS = ["dup_exact", "dup_near", "too_small", "language", "dup_near"]
DOMAINS = ["a.example", "b.example", "www.c.example", "d.example"]


@dataclass
class PoolSpec:
    pool: str
    decisions: str
    rows: list[dict] = field(default_factory=list)
    decided: list[dict] = field(default_factory=list)

    @property
    def kept_keys(self) -> set[str]:
        return {d["key"] for d in self.decided if d["keep"]}


def make_pool(root: str, shards: int = 6, rows_per_shard: int = 40, seed: int = 0) -> PoolSpec:
    rng = random.Random(seed)
    spec = PoolSpec(os.path.join(root, "pool"), os.path.join(root, "decisions"))
    os.makedirs(spec.decisions, exist_ok=True)
    for shard in range(shards):
        writer = ShardWriter(spec.pool, shard, "jpg", [])
        decided = []
        kept_so_far: list[str] = []
        for i in range(rows_per_shard):
            key = sample_key(shard, i, rows_per_shard)
            domain = DOMAINS[rng.randrange(len(DOMAINS))]
            roll = rng.random()
            row = {"key": key, "url": f"https://{domain}/img/{shard}/{i}.jpg",
                   "caption": " ".join(rng.choice(["red", "blue", "star", "photo", "of", "a", "big"])
                                       for _ in range(rng.randint(2, 9)))}
            image = None
            if roll < 0.08:
                reason = BEFORE_DOWNLOAD[i % 2]
                row.update(status="failed_to_download", reason=reason, error_message=None)
            elif roll < 0.2:
                reason = FAILURES[i % len(FAILURES)]
                status = "failed_to_resize" if reason == "decode_error" else "failed_to_download"
                row.update(status=status, reason=reason,
                           error_message="X-Robots-Tag: noai" if reason == "opt_out" else f"{reason} detail")
            else:
                w, h = rng.randint(40, 1200), rng.randint(40, 1200)
                image = rng.randbytes(rng.randint(50, 400))
                row.update(status="success", reason=None, error_message=None, width=min(w, 256), height=min(h, 256),
                           original_width=w, original_height=h, download_bytes=rng.randint(2_000, 90_000),
                           sha256=f"{rng.getrandbits(256):064x}", phash=f"{rng.getrandbits(64):016x}", luma_std=30.0)
            writer.add(row, image)
            spec.rows.append(row)
            decision = {"key": key, "keep": False, "reason": row.get("reason"), "dup_of": None,
                        "clip_score": None, "language": None, "language_score": None, "luma_std": None}
            if row["status"] == "success":
                decision.update(clip_score=round(rng.uniform(0.05, 0.45), 3), language=rng.choice(["en", "en", "de"]))
                if kept_so_far and rng.random() < 0.25:
                    reason = REJECTIONS[i % len(REJECTIONS)]
                    decision.update(reason=reason,
                                    dup_of=rng.choice(kept_so_far[:3]) if reason.startswith("dup_") else None)
                else:
                    decision.update(keep=True)
                    kept_so_far.append(key)
            decided.append(decision)
        successes = sum(r["status"] == "success" for r in spec.rows[-rows_per_shard:])
        writer.commit({"count": rows_per_shard, "successes": successes,
                       "failed_to_download": sum(r["status"] == "failed_to_download" for r in spec.rows[-rows_per_shard:]),
                       "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in spec.rows[-rows_per_shard:]),
                       "duration": 1.5 + shard, "start_time": 1_790_000_000.0 + shard,
                       "end_time": 1_790_000_010.0 + shard, "status_dict": {}})
        pq.write_table(pa.Table.from_pylist(decided, schema=DECISION_SCHEMA),
                       os.path.join(spec.decisions, f"{shard:05d}.parquet"))
        spec.decided.extend(decided)
    write_filter_stats(spec.decisions, spec.decided)
    return spec


def write_filter_stats(decisions: str, decided: list[dict]) -> None:
    """The filter's commit marker over hand-made decisions (shards/ refuses decisions without it)."""
    import json

    kept = sum(bool(d["keep"]) for d in decided)
    with open(os.path.join(decisions, "_filter_stats.json"), "w") as handle:
        json.dump({"rows": len(decided), "kept": kept, "rejected": len(decided) - kept}, handle)


def make_train_shards(spec: PoolSpec, folder: str, samples_per_shard: int, **options) -> dict:
    """Reshard ``spec``'s pool into ``folder`` in this process; return the manifest."""
    from shards.config import ShardsConfig
    from shards.reshard import reshard

    return reshard(ShardsConfig(pool=spec.pool, decisions=spec.decisions, output_folder=folder,
                                samples_per_shard=samples_per_shard, distributor="inline", report=False,
                                progress=False, **options))


def make_report(spec: PoolSpec, train: str, workers: int = 1) -> dict:
    """The report of ``spec``'s pool, decisions and the train shards in ``train``."""
    from shards.config import ReportConfig
    from shards.report import build_report

    return build_report(ReportConfig(pool=spec.pool, decisions=spec.decisions, train=train,
                                     output_folder="/unused", workers=workers, progress=False))
