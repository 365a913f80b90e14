"""Ingest against img2dataset and against the machine's limit, in one run.

    bash bench/peers.sh                       # once: img2dataset in .bench/img2dataset
    .venv/bin/python -m bench.ingest_vs_img2dataset [--rows 12000] [--processes 2] \
        [--threads 32] [--image_size 256] [--resize_mode border] [--repeat 2]

What it does, all on 127.0.0.1:

1. makes (or reuses) the demo web in data/bench/corpus and keeps only the URLs that
   should download (the planted slow/broken ones are ingest's tests' business, not a
   speed figure): at least 10,000 URLs of web-sized JPEGs (300-1600 px);
2. serves it with the project's web server and runs, alternately and ``--repeat``
   times each, ``python -m ingest`` and img2dataset with the *same command-line
   options* (our Ray distributor, img2dataset's default multiprocessing one), timing
   the whole command as a user would see it and sampling the summed memory of its
   process tree;
3. counts successes from each tool's ``_stats.json``;
4. quality: for ``--psnr_samples`` clean images, decodes the source at full
   resolution with Pillow, resizes it with Lanczos to the same geometry and compares
   each tool's output image with that reference (PSNR over the image content, not
   the padding);
5. the machine's limit: the same source images decoded, resized and encoded with our
   resizer in ``--processes`` processes in a tight loop, no network, no writing.

Prints a JSON summary and writes it to bench/results/ingest_vs_img2dataset.json.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from bench.measure import run_measured, save_result, tail, tree_rss_bytes
from infra.local.corpus import generate, load_ground_truth, write_url_list
from infra.local.webserver import load_routes, serve
from ingest.resizer import ResizeConfig, resize_image

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".bench/img2dataset/bin/img2dataset"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=12000, help="rows of the demo web to make (≈87%% download)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--resize_mode", default="border")
    p.add_argument("--copies", type=int, default=1,
                   help="repeat the URL list this many times (copies after the first get ?copy=K): longer runs")
    p.add_argument("--shard_size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--psnr_samples", type=int, default=300)
    p.add_argument("--limit_images", type=int, default=3000, help="images in the machine-limit loop")
    p.add_argument("--ours", default="ray,multiprocessing",
                   help="our distributors to run, comma-separated (img2dataset always uses multiprocessing)")
    p.add_argument("--work", default="data/bench/ingest", help="scratch folder (outputs are removed)")
    return p.parse_args()


def _common_options(args, url_list: str, out: str) -> list[str]:
    """The options both tools get, spelled the img2dataset way."""
    return [
        "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_folder", out, "--output_format", "webdataset",
        "--image_size", str(args.image_size), "--resize_mode", args.resize_mode,
        "--encode_format", "jpg", "--encode_quality", "95",
        "--processes_count", str(args.processes), "--thread_count", str(args.threads),
        "--number_sample_per_shard", str(args.shard_size), "--timeout", "10", "--retries", "0",
    ]  # fmt: skip


def _command(args, tool: str, url_list: str, out: str) -> list[str]:
    common = _common_options(args, url_list, out)
    if tool == "img2dataset":
        return [str(PEER), *common, "--distributor", "multiprocessing", "--enable_wandb", "False"]
    distributor = tool.split("-", 1)[1]  # webclip-ray, webclip-multiprocessing
    return [str(ROOT / ".venv/bin/python"), "-m", "ingest", *common,
            "--distributor", distributor, "--allow_networks", "127.0.0.1/32"]  # fmt: skip


def _successes(out: str) -> tuple[int, int]:
    count = successes = 0
    for path in glob.glob(f"{out}/*_stats.json"):
        with open(path) as f:
            stats = json.load(f)
        count += stats["count"]
        successes += stats["successes"]
    return count, successes


def _url_list(corpus: Path, work: Path, copies: int) -> tuple[str, pa.Table]:
    truth = load_ground_truth(corpus)
    ok = truth.filter(pc.is_null(truth.column("expected_ingest_reason")))
    urls, captions = ok.column("url").to_pylist(), ok.column("caption").to_pylist()
    table = pa.table({
        "url": [u if k == 0 else f"{u}?copy={k}" for k in range(copies) for u in urls],
        "caption": captions * copies,
    })  # fmt: skip
    path = work / "urls.parquet"
    pq.write_table(table, path)
    return str(path), ok


# -- quality ----------------------------------------------------------------------------


def _target(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    scale = size / (min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reference(source: bytes, size: int, mode: str) -> np.ndarray:
    """Full-resolution decode and a Lanczos resize of the whole image: the careful way."""
    image = Image.open(io.BytesIO(source))
    image = (ImageOps.exif_transpose(image) or image).convert("RGB")
    w, h = _target(image.width, image.height, size, mode)
    return np.asarray(image.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float64)


def _content(output: bytes, ref_shape: tuple[int, int], size: int, mode: str) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(output)).convert("RGB"), dtype=np.float64)
    h, w = ref_shape
    if mode == "border":  # the content sits centred in a white square
        top, left = (size - h) // 2, (size - w) // 2
        return image[top : top + h, left : left + w]
    return image


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _images_by_url(out: str) -> dict[str, bytes]:
    """url -> output image bytes, from each shard's parquet (key, url) and tar."""
    images: dict[str, bytes] = {}
    for parquet in sorted(glob.glob(f"{out}/*.parquet")):
        table = pq.read_table(parquet, columns=["key", "url", "status"]).to_pylist()
        url_of = {r["key"]: r["url"] for r in table if r["status"] == "success"}
        with tarfile.open(parquet[: -len(".parquet")] + ".tar") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext in ("jpg", "jpeg", "webp", "png") and key in url_of:
                    images[url_of[key]] = tar.extractfile(member).read()
    return images


def _quality(args, outputs: dict[str, str], ok: pa.Table, site: Path) -> dict:
    routes = load_routes(site)
    clean = [r for r in ok.to_pylist() if r["kind"] == "clean" and routes[r["path"]].file]
    sample = random.Random(0).sample(clean, min(args.psnr_samples, len(clean)))
    by_tool = {tool: _images_by_url(out) for tool, out in outputs.items()}
    scores: dict[str, list[float]] = {tool: [] for tool in outputs}
    for row in sample:
        source = (site / routes[row["path"]].file).read_bytes()
        ref = _reference(source, args.image_size, args.resize_mode)
        for tool, images in by_tool.items():
            if row["url"] in images:
                got = _content(images[row["url"]], ref.shape[:2], args.image_size, args.resize_mode)
                scores[tool].append(_psnr(got, ref))
    result = {}
    for tool, values in scores.items():
        finite = sorted(v for v in values if not math.isnan(v))
        result[tool] = {
            "images": len(values), "geometry_mismatches": len(values) - len(finite),
            "psnr_mean_db": round(statistics.fmean(finite), 2) if finite else None,
            "psnr_p5_db": round(finite[len(finite) // 20], 2) if finite else None,
            "psnr_min_db": round(finite[0], 2) if finite else None,
        }  # fmt: skip
    return result


# -- the machine's limit ---------------------------------------------------------------

_LIMIT_CFG: ResizeConfig | None = None


def _init_limit(cfg: ResizeConfig) -> None:
    global _LIMIT_CFG
    _LIMIT_CFG = cfg


def _resize_len(data: bytes) -> int:
    return len(resize_image(data, _LIMIT_CFG).data)


def _machine_limit(args, ok: pa.Table, site: Path) -> dict:
    routes = load_routes(site)
    files = [routes[p].file for p in ok.column("path").to_pylist() if routes[p].file]
    blobs = [(site / f).read_bytes() for f in files[: args.limit_images]]
    cfg = ResizeConfig(image_size=args.image_size, resize_mode=args.resize_mode, encode_quality=95)
    with mp.get_context("fork").Pool(args.processes, initializer=_init_limit, initargs=(cfg,)) as pool:
        pool.map(_resize_len, blobs[:50])  # warm up
        start = time.perf_counter()
        pool.map(_resize_len, blobs, chunksize=16)
        seconds = time.perf_counter() - start
    return {"images": len(blobs), "seconds": round(seconds, 2), "images_per_s": round(len(blobs) / seconds, 1)}


def _server_cpu_seconds() -> float:
    """CPU seconds used so far by this process's children: the web server, between runs."""
    cpu: dict[int, float] = {}
    tree_rss_bytes(os.getpid(), cpu)
    cpu.pop(os.getpid(), None)
    return sum(cpu.values())


# -- the run -----------------------------------------------------------------------------


def main() -> int:
    args = _args()
    if not PEER.exists():
        print(f"{PEER} not found: run `bash bench/peers.sh` first", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    corpus, work = ROOT / "data/bench/corpus", ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    generate(corpus, "http://127.0.0.1:1", args.rows, seed=0, progress=False)
    site = corpus / "site"
    runs: list[dict] = []
    with serve(site) as base_url:
        write_url_list(corpus, base_url)
        url_list, ok = _url_list(corpus, work, args.copies)
        print(f"bench: {ok.num_rows * args.copies} URLs on {base_url}", file=sys.stderr)
        kept: dict[str, str] = {}
        ours = [f"webclip-{d}" for d in args.ours.split(",")]
        for repeat in range(args.repeat):
            order = [*ours, "img2dataset"] if repeat % 2 == 0 else ["img2dataset", *reversed(ours)]
            for tool in order:
                out = str(work / f"out-{tool}")
                shutil.rmtree(out, ignore_errors=True)
                log = str(work / f"{tool}-{repeat}.log")
                server_cpu = _server_cpu_seconds()
                measured = run_measured(_command(args, tool, url_list, out), log_path=log)
                server_cpu = _server_cpu_seconds() - server_cpu
                if measured.returncode != 0:
                    print(f"{tool} failed (exit {measured.returncode}):\n{tail(log)}", file=sys.stderr)
                    return 1
                count, successes = _successes(out)
                run = {"tool": tool, "repeat": repeat, "seconds": round(measured.seconds, 2),
                       "count": count, "successes": successes,
                       "samples_per_s": round(count / measured.seconds, 1),
                       "peak_rss_mib": round(measured.peak_rss_bytes / 2**20),
                       "cpu_s": round(measured.cpu_seconds, 1),
                       "cpu_ms_per_sample": round(1000 * measured.cpu_seconds / max(count, 1), 2),
                       "server_cpu_s": round(server_cpu, 1)}  # fmt: skip
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs.append(run)
                kept[tool] = out
        quality = _quality(args, kept, ok, site)
    limit = _machine_limit(args, ok, site)

    def best(tool: str) -> dict:
        return max((r for r in runs if r["tool"] == tool), key=lambda r: r["samples_per_s"])

    theirs = best("img2dataset")

    def median_rate(tool: str) -> float:
        return statistics.median(r["samples_per_s"] for r in runs if r["tool"] == tool)

    summary = {
        "bench": "ingest_vs_img2dataset",
        "urls": ok.num_rows * args.copies, "processes": args.processes, "threads": args.threads,
        "image_size": args.image_size, "resize_mode": args.resize_mode,
        "runs": runs,
        "speed_ratio_median": {t: round(median_rate(t) / median_rate("img2dataset"), 2) for t in ours},
        "speed_ratio_best": {t: round(best(t)["samples_per_s"] / theirs["samples_per_s"], 2) for t in ours},
        "successes": {t: best(t)["successes"] for t in [*ours, "img2dataset"]},
        "quality": quality,
        "machine_limit": limit,
        "share_of_limit": {t: round(best(t)["successes"] / best(t)["seconds"] / limit["images_per_s"], 2) for t in ours},
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    save_result("ingest_vs_img2dataset", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
