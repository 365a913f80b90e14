"""Near-duplicate pass at scale: 5 million pHash rows on this machine, bounded memory per worker.

Writes fact tables (the filter's ``_work`` format, what pass 1 leaves for the global
passes) for ``--rows`` synthetic images — uniform random 64-bit pHashes, plus
``--planted`` near copies at 0..threshold bits with the same shape and tone — then
runs the filter's own near-duplicate pass on Ray and reports its wall time, the peak
resident memory of the largest single process (a worker) and of the whole process
tree, and the recall on the planted copies. Results go to bench/results/.

    python -m bench.near_dup_scale --rows 5000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import save_result, tree_pids
from filter.config import FilterConfig
from filter.facts import FACT_SCHEMA
from core.executor import Executor
from filter.run import near_duplicate_pass


def write_facts(work: str, rows: int, shards: int, planted_share: float, threshold: int, seed: int) -> tuple[list[int], dict]:
    """Fact files with planted near copies; returns (shard ids, {copy row id: source row id})."""
    rng = np.random.default_rng(seed)
    per_shard = -(-rows // shards)
    planted: dict[int, int] = {}
    sources: list[tuple[int, np.uint64, float, float]] = []
    for shard in range(shards):
        n = min(per_shard, rows - shard * per_shard)
        ids = (np.int64(shard) << np.int64(32)) | np.arange(n, dtype=np.int64)
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
        aspect = np.log(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3], n)).astype(np.float32)
        luma = rng.normal(28, 6, n).astype(np.float32)
        if shard:
            copies = rng.random(n) < planted_share
            for index in np.flatnonzero(copies):
                src_id, src_hash, src_aspect, src_luma = sources[rng.integers(len(sources))]
                bits = rng.choice(64, int(rng.integers(0, threshold + 1)), replace=False)
                hashes[index] = src_hash ^ np.uint64(sum(1 << int(b) for b in bits))
                aspect[index], luma[index] = src_aspect, src_luma
                planted[int(ids[index])] = src_id
        keep = rng.choice(n, min(n, 2000), replace=False)
        sources += [(int(ids[i]), hashes[i], aspect[i], luma[i]) for i in keep]
        table = pa.table({
            "row_id": ids, "key": pa.nulls(n, pa.string()), "pre_reason": pa.nulls(n, pa.string()),
            "url_fp": np.ones(n, np.uint64), "sha_hi": np.zeros(n, np.uint64), "sha_lo": np.zeros(n, np.uint64),
            "phash": hashes, "clip_score": pa.nulls(n, pa.float32()), "language": pa.nulls(n, pa.string()),
            "language_score": pa.nulls(n, pa.float32()), "luma_std": luma, "log_aspect": aspect,
        }, schema=FACT_SCHEMA)
        pq.write_table(table, os.path.join(work, f"{shard:05d}.parquet"), compression="zstd")
    return list(range(shards)), planted


class PeakMemory:
    """Samples the RSS of this process and its descendants (a local Ray's raylet and workers)."""

    def __init__(self) -> None:
        self.largest = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            sizes = []
            for pid in tree_pids(os.getpid()):
                try:
                    with open(f"/proc/{pid}/statm", "rb") as f:
                        sizes.append(int(f.read().split()[1]) * page)
                except OSError:
                    pass
            self.largest = max(self.largest, max(sizes, default=0))
            self.tree = max(self.tree, sum(sizes))
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--planted", type=float, default=0.05, help="share of rows that are near copies")
    parser.add_argument("--threshold", type=int, default=10)
    parser.add_argument("--partition-rows", type=int, default=4_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="near-dup-scale-")
    try:
        start = time.time()
        shard_ids, planted = write_facts(work, args.rows, args.shards, args.planted, args.threshold, args.seed)
        print(f"wrote {args.rows:,} fact rows ({len(planted):,} planted copies) in {time.time() - start:.0f}s",
              flush=True)
        cfg = FilterConfig(pool="-", output_folder="-", distributor="ray", workers=args.workers,
                           partition_rows=args.partition_rows, near_dup_threshold=args.threshold)
        with Executor(cfg, desc="filter") as ex:
            with PeakMemory() as memory:
                start = time.time()
                (rejected, keepers), info = near_duplicate_pass(cfg, ex, work, shard_ids,
                                                                np.empty(0, np.int64), args.rows)
                seconds = time.time() - start
        caught = set(rejected.tolist())
        recall = sum(1 for r in planted if r in caught) / max(1, len(planted))
        result = {
            "rows": args.rows, "planted": len(planted), "threshold": args.threshold, "workers": args.workers,
            "partition_rows": args.partition_rows, "seconds": round(seconds, 1), **info,
            "rejected": int(len(rejected)), "planted_recall": round(recall, 4),
            "false_rejections": int(len(caught - set(planted))),
            "peak_rss_largest_process_mib": round(memory.largest / 2**20),
            "peak_rss_all_processes_mib": round(memory.tree / 2**20),
            "command": "python -m bench.near_dup_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        print(result)
        save_result("near_dup_scale", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
