"""Does ingest's memory grow with the URL list? A 10x longer list, the same peak.

    .venv/bin/python -m bench.ingest_memory [--small 10000] [--large 100000] [--processes 2]

Serves the demo web in data/bench/corpus on 127.0.0.1 and runs ``python -m ingest``
(Ray, as users run it) on two URL lists, ``--small`` and ``--large`` rows long. The
lists cycle over the corpus's downloadable images, each URL made unique by a query
string, so the large run does ten times the downloading, decoding and writing. The
peak of the summed resident memory of the whole process tree (driver, Ray's raylet
and GCS, the shard workers) is sampled every 0.2 s. Goal: large / small <= 1.2.

Prints a JSON summary and writes bench/results/ingest_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.measure import run_measured, save_result, tail
from infra.local.corpus import generate, load_ground_truth, write_url_list
from infra.local.webserver import serve

ROOT = Path(__file__).resolve().parent.parent


def _url_list(corpus: Path, rows: int, path: Path) -> None:
    truth = load_ground_truth(corpus)
    ok = truth.filter(pc.is_null(truth.column("expected_ingest_reason")))
    urls, captions = ok.column("url").to_pylist(), ok.column("caption").to_pylist()
    n = len(urls)
    table = pa.table({
        "url": [f"{urls[i % n]}?copy={i // n}" for i in range(rows)],
        "caption": [captions[i % n] for i in range(rows)],
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=10_000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=100_000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--corpus_rows", type=int, default=12000)
    p.add_argument("--work", default="data/bench/memory")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    corpus, work = ROOT / "data/bench/corpus", ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    generate(corpus, "http://127.0.0.1:1", args.corpus_rows, seed=0, progress=False)
    runs = []
    with serve(corpus / "site") as base_url:
        write_url_list(corpus, base_url)
        for rows in (args.small, args.large):
            url_list, out = work / f"urls-{rows}.parquet", work / f"out-{rows}"
            _url_list(corpus, rows, url_list)
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                str(ROOT / ".venv/bin/python"), "-m", "ingest", "--url_list", str(url_list),
                "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
                "--output_folder", str(out), "--image_size", "256", "--resize_mode", "border",
                "--processes_count", str(args.processes), "--thread_count", str(args.threads),
                "--number_sample_per_shard", "1000", "--timeout", "10",
                "--distributor", "ray", "--allow_networks", "127.0.0.1/32",
            ]  # fmt: skip
            log = str(work / f"ingest-{rows}.log")
            measured = run_measured(cmd, log_path=log)
            if measured.returncode != 0:
                print(f"ingest failed (exit {measured.returncode}):\n{tail(log)}", file=sys.stderr)
                return 1
            run = {"rows": rows, "seconds": round(measured.seconds, 1),
                   "samples_per_s": round(rows / measured.seconds, 1),
                   "peak_rss_mib": round(measured.peak_rss_bytes / 2**20)}  # fmt: skip
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
            shutil.rmtree(out, ignore_errors=True)
    summary = {
        "bench": "ingest_memory", "processes": args.processes, "threads": args.threads, "runs": runs,
        "peak_ratio_large_over_small": round(runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3),
        "command": " ".join(sys.argv), "cpus": os.cpu_count(),
    }  # fmt: skip
    save_result("ingest_memory", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
