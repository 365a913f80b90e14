"""Ingest throughput on the demo web: samples/s of `python -m ingest`, end to end.

    .venv/bin/python -m bench.ingest_demo [--rows 12000] [--processes 2] [--repeat 1]

Generates (or reuses) the demo corpus under data/bench/corpus, serves it on
127.0.0.1, and times a fresh ingest (Ray start-up included, as a user sees it) into
a temporary folder. Prints one JSON line per run; BENCHMARKS.md records the figures
with the command. The corpus plants slow responses that run into the timeout, as
the web does; their share of the time is part of the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from core.config import from_dict, load_yaml
from infra.local.corpus import generate, write_url_list
from infra.local.webserver import serve
from ingest.config import IngestConfig
from ingest.run import run_ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--config", default="configs/demo/ingest.yaml")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    corpus = "data/bench/corpus"
    generate(corpus, "http://127.0.0.1:1", args.rows, seed=0, progress=False)
    with serve(f"{corpus}/site") as base_url:
        write_url_list(corpus, base_url)
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="webclip-bench-") as out:
                values = load_yaml(args.config) | {
                    "url_list": f"{corpus}/urls.parquet", "output_folder": out,
                    "processes_count": args.processes, "progress": False,
                }
                cfg = from_dict(IngestConfig, values)
                start = time.perf_counter()
                summary = run_ingest(cfg)
                seconds = time.perf_counter() - start
                print(json.dumps({
                    "bench": "ingest_demo", "rows": summary.count, "successes": summary.successes,
                    "seconds": round(seconds, 2), "samples_per_s": round(summary.count / seconds, 1),
                    "processes": args.processes, "image_size": cfg.image_size, "timeout": cfg.timeout,
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                }), flush=True)


if __name__ == "__main__":
    main()
