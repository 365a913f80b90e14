"""shards/ at a million metadata rows: report, verify (and reshard), time and peak memory.

    .venv/bin/python -m bench.shards_scale [--rows 1000000] [--shard-rows 10000] [--small 100000]

The issue's bar: `python -m shards.report` and `python -m shards.verify` over 1M
metadata rows each finish within 2 minutes on this 2-core machine, in bounded memory.
The pool is synthetic but complete: 1M rows in ``--shard-rows`` shards, ~85% successes
with a tar member triple each (tiny image payloads: the bytes are hashed and parsed,
not decoded, so their size only moves the disk time), ~40k domains, reasons, sizes,
CLIP scores, languages and duplicate clusters in the decisions. Each command runs as
a user would run it (a subprocess, default workers = one per CPU), measured by
``bench.measure.run_measured``: wall time and the peak summed RSS of its process tree.
Bounded memory is shown by the same commands on ``--small`` rows: the peak should
not grow with the row count. ``--reshard`` also times resharding and verifying the
train shards (with the manifest).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import run_measured
from core.layout import sample_key
from core.shard_writer import ShardWriter
from filter.run import DECISION_SCHEMA

FAILURES = ["http_404", "timeout", "decode_error", "opt_out", "connection_error", "http_5xx", "not_image"]
REJECTIONS = ["dup_exact", "dup_near", "too_small", "aspect_ratio", "caption_short", "language"]
WORDS = "a photo of the red blue green star cross hexagon circle big small old new on in with".split()


def _write_shard(args: tuple) -> None:
    pool, decisions, shard, rows = args
    rng = random.Random(shard)
    writer = ShardWriter(pool, shard, "jpg", [])
    decided = []
    kept: list[str] = []
    successes = 0
    for i in range(rows):
        key = sample_key(shard, i, rows)
        domain = f"site{int(rng.paretovariate(1.1)) % 40_000}.example"
        row = {"key": key, "url": f"https://{domain}/i/{shard}/{i}.jpg",
               "caption": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))}
        image = None
        roll = rng.random()
        decision = {"key": key, "keep": False, "reason": None, "dup_of": None, "clip_score": None,
                    "language": None, "language_score": None, "luma_std": None}
        if roll < 0.02:
            row.update(status="failed_to_download", reason="dup_url")
        elif roll < 0.15:
            reason = FAILURES[i % len(FAILURES)]
            row.update(status="failed_to_resize" if reason == "decode_error" else "failed_to_download", reason=reason,
                       error_message="X-Robots-Tag: noai" if reason == "opt_out" else reason)
        else:
            w, h = int(rng.lognormvariate(6.3, 0.5)), int(rng.lognormvariate(6.2, 0.5))
            image = rng.randbytes(rng.randint(64, 256))
            successes += 1
            row.update(status="success", width=min(w, 256), height=min(h, 256), original_width=w, original_height=h,
                       download_bytes=int(rng.lognormvariate(10, 1)), sha256=f"{rng.getrandbits(256):064x}",
                       phash=f"{rng.getrandbits(64):016x}", luma_std=30.0)
            decision.update(clip_score=rng.gauss(0.28, 0.06), language=rng.choice(["en"] * 8 + ["de", "fr"]))
            if kept and rng.random() < 0.2:
                reason = REJECTIONS[i % len(REJECTIONS)]
                decision.update(reason=reason, dup_of=rng.choice(kept[-50:]) if reason.startswith("dup_") else None)
            else:
                decision["keep"] = True
                kept.append(key)
        decision["reason"] = decision["reason"] or row.get("reason")
        writer.add(row, image)
        decided.append(decision)
    writer.commit({"count": rows, "successes": successes, "failed_to_download": rows - successes,
                   "failed_to_resize": 0, "duration": 60.0, "start_time": 1.79e9 + shard * 60,
                   "end_time": 1.79e9 + shard * 60 + 60, "status_dict": {}})
    pq.write_table(pa.Table.from_pylist(decided, schema=DECISION_SCHEMA), f"{decisions}/{shard:05d}.parquet")


def generate(folder: Path, rows: int, shard_rows: int) -> tuple[str, str]:
    pool, decisions = folder / "pool", folder / "decisions"
    marker = folder / "generated.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "shard_rows": shard_rows}:
        return str(pool), str(decisions)
    shutil.rmtree(folder, ignore_errors=True)
    decisions.mkdir(parents=True)
    shards = (rows + shard_rows - 1) // shard_rows
    tasks = [(str(pool), str(decisions), s, min(shard_rows, rows - s * shard_rows)) for s in range(shards)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as workers:
        workers.map(_write_shard, tasks, chunksize=1)
    marker.write_text(json.dumps({"rows": rows, "shard_rows": shard_rows}))
    return str(pool), str(decisions)


def measure(name: str, cmd: list[str], log: Path) -> dict:
    result = run_measured(cmd, log_path=str(log))
    if result.returncode != 0:
        sys.exit(f"{name} failed ({result.returncode}); see {log}")
    out = {"seconds": round(result.seconds, 1), "peak_rss_mib": round(result.peak_rss_bytes / 2**20),
           "cpu_seconds": round(result.cpu_seconds, 1)}
    print(f"  {name:<14} {out['seconds']:>7.1f} s   peak RSS {out['peak_rss_mib']:>5} MiB   "
          f"CPU {out['cpu_seconds']:.0f} s", flush=True)
    return out


def run(folder: Path, rows: int, shard_rows: int, reshard: bool) -> dict:
    t0 = time.time()
    pool, decisions = generate(folder, rows, shard_rows)
    print(f"{rows:,} rows in {folder} (made in {time.time() - t0:.0f}s)", flush=True)
    py = sys.executable
    results = {"rows": rows}
    results["report"] = measure("report", [py, "-m", "shards.report", "--pool", pool, "--decisions", decisions,
                                           "--output_folder", str(folder / "report"), "--progress", "false"],
                                folder / "report.log")
    results["verify_pool"] = measure("verify (pool)", [py, "-m", "shards.verify", "--folder", pool,
                                                       "--progress", "false"], folder / "verify.log")
    if reshard:
        train = folder / "train"
        results["reshard"] = measure("reshard", [py, "-m", "shards", "--pool", pool, "--decisions", decisions,
                                                 "--output_folder", str(train), "--overwrite", "true", "--report",
                                                 "false", "--progress", "false"], folder / "reshard.log")
        results["verify_train"] = measure("verify (train)", [py, "-m", "shards.verify", "--folder", str(train),
                                                             "--progress", "false"], folder / "verify-train.log")
    summary = json.loads((folder / "report" / "report.json").read_text())
    results["funnel"] = {s["step"]: s["count"] for s in summary["funnel"]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000, help="rows of the bounded-memory comparison (0: skip)")
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--reshard", action="store_true", help="also reshard the big pool and verify the result")
    parser.add_argument("--workdir", default="data/bench/shards")
    args = parser.parse_args()
    out = {"load_average_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.small:
        out["small"] = run(Path(args.workdir) / f"rows-{args.small}", args.small, args.shard_rows, False)
    out["big"] = run(Path(args.workdir) / f"rows-{args.rows}", args.rows, args.shard_rows, args.reshard)
    out["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))
    Path("bench/results").mkdir(exist_ok=True)
    Path("bench/results/shards_scale.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
