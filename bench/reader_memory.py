"""Peak memory of reading and splitting a big parquet URL list into shards.

The issue's bar: reading and splitting a 10-million-row parquet list keeps peak
memory under 1 GiB. This script writes such a list (url, caption) in a temporary
folder, then, in a fresh process, runs ``ingest.reader.read_shards`` over it exactly
as ``python -m ingest`` does (shards of ``--shard_size`` rows, each built and then
dropped as a distributor would hand it off), and prints that process's peak RSS.

    .venv/bin/python bench/reader_memory.py                 # 10M rows
    .venv/bin/python bench/reader_memory.py --rows 1000000  # quicker

Generation and measurement run in separate processes, so the figure is the
reader's alone (imports included: pyarrow, fsspec, ...).
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


def generate(path: str, rows: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, row_group):
            ids = pc.cast(pa.array(range(start, min(start + row_group, rows)), pa.int64()), pa.string())
            urls = pc.binary_join_element_wise("http://127.0.0.1:1/img/", ids, ".jpg", "")
            captions = pc.binary_join_element_wise("a photo of item number ", ids, " on a plain background", "")
            writer.write_table(pa.table({"url": urls, "caption": captions}, schema=schema), row_group_size=row_group)


def measure(path: str, shard_size: int) -> dict:
    sys.path.insert(0, str(REPO))
    from ingest.reader import read_shards

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    rows = shards = 0
    for shard in read_shards(path, "parquet", "url", "caption", [], shard_size):
        rows += len(shard)
        shards += 1
    return {
        "rows": rows,
        "shards": shards,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "rss_after_imports_mib": round(baseline / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shard_size", type=int, default=10_000, help="rows per shard (ingest's default)")
    parser.add_argument("--row_group", type=int, default=1 << 20, help="rows per parquet row group (pyarrow's default)")
    parser.add_argument("--generate", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.rows, args.row_group)
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.shard_size)))
        return 0
    with tempfile.TemporaryDirectory(prefix="webclip-reader-memory-") as tmp:
        path = str(Path(tmp) / "urls.parquet")
        me = [sys.executable, __file__, "--rows", str(args.rows), "--row_group", str(args.row_group),
              "--shard_size", str(args.shard_size)]
        subprocess.run([*me, "--generate", path], check=True)
        size_mib = Path(path).stat().st_size / 2**20
        out = subprocess.run([*me, "--measure", path], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    result["file_mib"] = round(size_mib, 1)
    print(json.dumps(result))
    verdict = "under" if result["peak_rss_mib"] < 1024 else "OVER"
    print(f"reading and splitting {result['rows']:,} rows into {result['shards']:,} shards: "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB ({verdict} the 1 GiB bar), {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
