"""Peak memory per process of reading a big URL list and planning it before download, and the cost a row.

Two measurements of the same list (10M rows by default): ``read``, ingest's reader splitting
it into shards (goal: under 1 GiB), and ``plan``, what ``python -m ingest`` does before its
downloads: the job-wide (URL, caption) dedupe (``ingest.dedupe``: the list read once, its
fingerprints spilled and sorted by partition on the executor's workers) and then the list
read again, each shard taking its duplicate marks and the caption rules (``ingest.plan``).
Peak RSS is given per process: the driver's, and the largest worker's.
The list is web-like: https URLs on a thousand hosts without ports, captions of a
sentence, 2% of rows repeating an earlier row's pair and 2% junk captions.

Each mode runs in a fresh process, so each figure is its own: ``read`` (the reader
alone) and ``plan`` (reader twice + dedupe + rules); the planner's per-row cost is the
difference of their CPU times, the workers' included (process time: wall time on a shared
machine says little).

    .venv/bin/python bench/plan_memory.py                 # 10M rows, 2 worker processes
    .venv/bin/python bench/plan_memory.py --rows 1000000  # quicker
    .venv/bin/python bench/plan_memory.py --rows 100000000 --tmp data/bench/plan   # ~1.5 GiB list + 1.5 GiB spill: a roomy disk
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEAT_EVERY = 50  # every 50th row repeats an earlier row's pair: 2%
JUNK_EVERY = 50  # and, offset by 25, every 50th has a junk caption: 2%
REPEAT_FROM = 20_001  # a repeat copies the row this far back (itself neither a repeat nor junk)


def generate(path: str, rows: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, row_group):
            index = pa.array(range(start, min(start + row_group, rows)), pa.int64())
            repeat = pc.equal(pc.subtract(index, pc.multiply(pc.divide(index, REPEAT_EVERY), REPEAT_EVERY)), 49)
            repeat = pc.and_(repeat, pc.greater_equal(index, REPEAT_FROM))
            source = pc.if_else(repeat, pc.subtract(index, REPEAT_FROM), index)  # two shards back, not a repeat
            ids = pc.cast(source, pa.string())
            hosts = pc.cast(pc.subtract(source, pc.multiply(pc.divide(source, 1000), 1000)), pa.string())
            urls = pc.binary_join_element_wise("https://img", hosts, ".example.com/photos/", ids, ".jpg", "")
            captions = pc.binary_join_element_wise("a photo of item number ", ids, " on a plain background", "")
            junk = pc.equal(pc.subtract(index, pc.multiply(pc.divide(index, JUNK_EVERY), JUNK_EVERY)), 25)
            captions = pc.if_else(junk, pc.binary_join_element_wise("IMG_", ids, ".JPG", ""), captions)
            writer.write_table(pa.table({"url": urls, "caption": captions}, schema=schema), row_group_size=row_group)


def _du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class _WorkerPeaks:
    """The largest worker RSS seen in each pass (``Executor.map``'s ``desc``), sampled from /proc."""

    def __init__(self, executor) -> None:
        self.executor, self.peaks, self.stage, self.done = executor, {}, "start", threading.Event()

    def __enter__(self) -> dict:
        original = self.executor.map

        def map_with_stage(*args, desc=None, **kwargs):
            self.stage = desc or "map"
            return original(*args, desc=desc, **kwargs)

        self.executor.map = map_with_stage
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self.peaks

    def _sample(self) -> None:
        from bench.measure import tree_pids

        me = os.getpid()
        while not self.done.wait(0.2):
            for pid in tree_pids(me):
                try:
                    with open(f"/proc/{pid}/statm", "rb") as f:
                        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
                except OSError:
                    continue
                if pid != me:
                    self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), round(rss, 1))

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def measure(path: str, shard_size: int, plan: bool, distributor: str, workers: int, rows_per_partition: int,
            work: str) -> dict:
    """One mode in this fresh process; ``plan``: what ``python -m ingest`` does before its downloads."""
    sys.path.insert(0, str(REPO))
    from core.executor import Execution, Executor
    from ingest import dedupe
    from ingest.plan import Planner, PlanRules
    from ingest.reader import read_shards

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    planner = Planner(PlanRules())
    start, cpu_start = time.perf_counter(), time.process_time()
    marks, passes = None, {}

    def shards():
        return read_shards(path, "parquet", "url", "caption", [], shard_size)

    if plan:
        with Executor(Execution(distributor=distributor, workers=workers, progress=False)) as executor, \
                _WorkerPeaks(executor) as by_pass:
            marks = dedupe.plan_duplicates(executor, work, shards(), shard_size, rows_per_partition)
        passes["worker_peak_by_pass_mib"] = by_pass
        passes |= {"partitions": marks.partitions, "passes_seconds": round(time.perf_counter() - start, 1),
                  "passes_cpu_driver_seconds": round(time.process_time() - cpu_start, 1),
                  "spill_mib": round(_du(Path(work) / dedupe.PLAN_FOLDER) / 2**20, 1)}
    rows = count = 0
    for shard in shards():
        if plan:
            shard = planner.plan(shard, marks.rows(shard))
        rows += len(shard)
        count += 1
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined when the executor closed
    result = {
        "mode": f"plan ({distributor}, {workers} workers)" if plan else "read",
        "rows": rows,
        "shards": count,
        "seconds": round(time.perf_counter() - start, 1),
        # robust to a busy machine: this process and its workers
        "cpu_seconds": round(time.process_time() - cpu_start + children.ru_utime + children.ru_stime, 1),
        "cpu_driver_seconds": round(time.process_time() - cpu_start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "peak_rss_worker_mib": round(children.ru_maxrss / 1024, 1),  # the largest worker's peak
        "rss_after_imports_mib": round(baseline / 1024, 1),
        **passes,
    }
    if plan:
        result["marked"] = dict(planner.marked)
    return result


def main() -> int:
    sys.path.insert(0, str(REPO))
    from ingest.dedupe import ROWS_PER_PARTITION

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shard_size", type=int, default=10_000, help="rows per shard (ingest's default)")
    parser.add_argument("--row_group", type=int, default=1 << 20, help="rows per parquet row group")
    parser.add_argument("--distributor", default="processes", help="where the dedupe's units run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows_per_partition", type=int, default=ROWS_PER_PARTITION,
                        help="ingest's --plan_rows_per_partition")
    parser.add_argument("--tmp", default=None, help="where the list and the spill go (default: the system's)")
    parser.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--work", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.rows, args.row_group)
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.shard_size, args.plan, args.distributor, args.workers,
                                 args.rows_per_partition, args.work)))
        return 0
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="webclip-plan-memory-", dir=args.tmp) as tmp:
        path = str(Path(tmp) / "urls.parquet")
        me = [sys.executable, __file__, "--rows", str(args.rows), "--row_group", str(args.row_group),
              "--shard_size", str(args.shard_size), "--distributor", args.distributor, "--workers",
              str(args.workers), "--rows_per_partition", str(args.rows_per_partition)]
        started = time.perf_counter()
        subprocess.run([*me, "--generate", path], check=True)
        print(f"generated {args.rows:,} rows ({Path(path).stat().st_size / 2**20:,.0f} MiB) in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        results = {}
        for mode in ("read", "plan"):
            extra = ["--plan", "--work", str(Path(tmp) / "pool")] if mode == "plan" else []
            out = subprocess.run([*me, "--measure", path, *extra], check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    read, plan = results["read"], results["plan"]
    per_row_us = (plan["cpu_seconds"] - read["cpu_seconds"]) / plan["rows"] * 1e6
    print(json.dumps({"read": read, "plan": plan, "planner_us_per_row": round(per_row_us, 2)}))
    verdict = "under" if max(plan["peak_rss_mib"], plan["peak_rss_worker_mib"]) < 1024 else "OVER"
    print(f"reading and planning {plan['rows']:,} rows in {plan['partitions']} partitions: peak RSS driver "
          f"{plan['peak_rss_mib']:.0f} MiB, largest worker {plan['peak_rss_worker_mib']:.0f} MiB ({verdict} the 1 GiB "
          f"bar; reader alone {read['peak_rss_mib']:.0f} MiB); {plan['cpu_seconds']} CPU s (reader alone "
          f"{read['cpu_seconds']} CPU s): the planner costs {per_row_us:.1f} CPU µs a row, its spill "
          f"{plan['spill_mib']:,.0f} MiB; marked {plan['marked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
