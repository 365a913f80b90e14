"""Peak memory of reading a big URL list, and the per-row cost of planning it before download.

Two measurements of the same 10M-row list: ``read``, ingest's reader splitting it into
shards (goal: under 1 GiB), and ``plan``, the same plus what ``python -m ingest`` does
in the driver as each shard is read: ``ingest.plan`` (URL normalisation, the job-wide
(URL, caption) fingerprint set, caption rules).
The list is web-like: https URLs on a thousand hosts without ports, captions of a
sentence, 2% of rows repeating an earlier row's pair and 2% junk captions.

Each mode runs in a fresh process, so each figure is its own: ``read`` (the reader
alone) and ``plan`` (reader + planner); the planner's per-row cost is the difference
of their CPU times (process time: wall time on a shared machine says little).

    .venv/bin/python bench/plan_memory.py                 # 10M rows
    .venv/bin/python bench/plan_memory.py --rows 1000000  # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
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


def measure(path: str, shard_size: int, plan: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from ingest.plan import Planner, PlanRules
    from ingest.reader import read_shards

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    planner = Planner(PlanRules())
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = shards = 0
    for shard in read_shards(path, "parquet", "url", "caption", [], shard_size):
        if plan:
            shard = planner.plan(shard)
        rows += len(shard)
        shards += 1
    result = {
        "mode": "plan" if plan else "read",
        "rows": rows,
        "shards": shards,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),  # robust to a busy machine
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_after_imports_mib": round(baseline / 1024, 1),
    }
    if plan:
        result.update(marked=dict(planner.marked), fingerprints=len(planner.seen), runs=planner.seen.runs,
                      fingerprint_mib=round(planner.seen.nbytes / 2**20, 1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shard_size", type=int, default=10_000, help="rows per shard (ingest's default)")
    parser.add_argument("--row_group", type=int, default=1 << 20, help="rows per parquet row group")
    parser.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.rows, args.row_group)
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.shard_size, args.plan)))
        return 0
    with tempfile.TemporaryDirectory(prefix="webclip-plan-memory-") as tmp:
        path = str(Path(tmp) / "urls.parquet")
        me = [sys.executable, __file__, "--rows", str(args.rows), "--row_group", str(args.row_group),
              "--shard_size", str(args.shard_size)]
        subprocess.run([*me, "--generate", path], check=True)
        results = {}
        for mode in ("read", "plan"):
            extra = ["--plan"] if mode == "plan" else []
            out = subprocess.run([*me, "--measure", path, *extra], check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    read, plan = results["read"], results["plan"]
    per_row_us = (plan["cpu_seconds"] - read["cpu_seconds"]) / plan["rows"] * 1e6
    print(json.dumps({"read": read, "plan": plan, "planner_us_per_row": round(per_row_us, 2)}))
    verdict = "under" if plan["peak_rss_mib"] < 1024 else "OVER"
    print(f"reading and planning {plan['rows']:,} rows: peak RSS {plan['peak_rss_mib']:.0f} MiB ({verdict} the "
          f"1 GiB bar; reader alone {read['peak_rss_mib']:.0f} MiB), {plan['cpu_seconds']} CPU s (reader alone "
          f"{read['cpu_seconds']} CPU s): the planner costs {per_row_us:.1f} CPU µs a row; marked {plan['marked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
