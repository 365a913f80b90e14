"""Ingest against img2dataset and against the machine's limit, in one run.

    bash bench/peers.sh                       # once: img2dataset in .bench/img2dataset
    .venv/bin/python -m bench.ingest_vs_img2dataset            # the default run, ~5 min on 2 cores
        [--corpus photos|synthetic] [--count 10000] [--resize_modes border,center_crop]
        [--ours default,ray,processes] [--processes 2] [--threads 32] [--repeat 1]

What it does, all on 127.0.0.1:

1. makes (or reuses) the web: by default ``--count`` real photographs of web sizes
   (``bench.photo_corpus``: JPEG 320-2048 px, quality 80-95, some progressive, a few
   PNG and WebP) in data/bench/photos; with ``--corpus synthetic`` the demo web's
   scenes (data/bench/corpus), keeping only the URLs that should download;
2. serves it with the project's web server and, for each resize mode, runs
   alternately and ``--repeat`` times each ``python -m ingest`` and img2dataset with
   the *same command-line options* (ours with its default distributor unless
   ``--ours`` names others; img2dataset with its default multiprocessing one), timing
   the whole command as a user would see it and sampling the summed memory and CPU
   of its process tree;
3. counts successes from each tool's ``_stats.json``;
4. quality: for ``--psnr_samples`` images, decodes the source at full resolution with
   Pillow, resizes it with Lanczos to the same geometry and compares each tool's
   output image with that reference (PSNR over the image content, not the padding);
5. the machine's limit: the same source images decoded, resized and encoded with our
   resizer in ``--processes`` processes in a tight loop, no network, no writing;
6. Ray's fixed cost on this machine (``bench.ray_fixed_cost``: start, first task,
   idle daemons, stop), which ``--ours ray`` pays on top of the work.

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
import subprocess
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
from bench.photo_corpus import generate_photos
from infra.local.corpus import generate, load_ground_truth, write_url_list
from infra.local.webserver import load_routes, serve
from ingest.resizer import ResizeConfig, resize_image

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / ".bench/img2dataset/bin/img2dataset"
PHOTOS = 10_000  # the photo corpus made and kept on disk; --count uses its first images


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=("photos", "synthetic"), default="photos",
                   help="photos: real photographs (bench.photo_corpus); synthetic: the demo web's scenes")
    p.add_argument("--count", type=int, default=PHOTOS, help="URLs of the photo corpus to download")
    p.add_argument("--rows", type=int, default=12000, help="rows of the synthetic demo web (≈87%% download)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--resize_modes", default="border,center_crop", help="comma-separated; each is a separate run")
    p.add_argument("--copies", type=int, default=1,
                   help="repeat the URL list this many times (copies after the first get ?copy=K): longer runs")
    p.add_argument("--shard_size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per resize mode")
    p.add_argument("--psnr_samples", type=int, default=300)
    p.add_argument("--limit_images", type=int, default=3000, help="images in the machine-limit loop")
    p.add_argument("--ours", default="default",
                   help="our distributors to run, comma-separated: default (no --distributor option), ray, "
                   "processes, ... (img2dataset always uses multiprocessing)")
    p.add_argument("--no_ray_cost", action="store_true", help="skip the measurement of Ray's fixed cost")
    p.add_argument("--work", default="data/bench/ingest", help="scratch folder (outputs are removed)")
    return p.parse_args()


def _common_options(args, url_list: str, out: str, mode: str) -> list[str]:
    """The options both tools get, spelled the img2dataset way."""
    return [
        "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_folder", out, "--output_format", "webdataset",
        "--image_size", str(args.image_size), "--resize_mode", mode,
        "--encode_format", "jpg", "--encode_quality", "95",
        "--processes_count", str(args.processes), "--thread_count", str(args.threads),
        "--number_sample_per_shard", str(args.shard_size), "--timeout", "10", "--retries", "0",
    ]  # fmt: skip


def _command(args, tool: str, url_list: str, out: str, mode: str) -> list[str]:
    common = _common_options(args, url_list, out, mode)
    if tool == "img2dataset":
        return [str(PEER), *common, "--distributor", "multiprocessing", "--enable_wandb", "False"]
    distributor = tool.split("-", 1)[1]  # webclip-default, webclip-ray, webclip-processes
    chosen = [] if distributor == "default" else ["--distributor", distributor]
    return [str(ROOT / ".venv/bin/python"), "-m", "ingest", *common, *chosen,
            "--allow_networks", "127.0.0.1/32"]  # fmt: skip


def _successes(out: str) -> tuple[int, int]:
    count = successes = 0
    for path in glob.glob(f"{out}/*_stats.json"):
        with open(path) as f:
            stats = json.load(f)
        count += stats["count"]
        successes += stats["successes"]
    return count, successes


def _web(args, base_url: str | None) -> tuple[Path, pa.Table | None]:
    """(site folder, rows that should download: url, caption, path); made first with base_url None."""
    if args.corpus == "photos":
        out = ROOT / "data/bench/photos"
        photos = generate_photos(out, max(args.count, PHOTOS), seed=0, progress=True).slice(0, args.count)
        if base_url is None:
            return out / "site", None
        urls = [base_url + p for p in photos.column("path").to_pylist()]
        return out / "site", pa.table({"url": urls, "caption": photos.column("caption"), "path": photos.column("path")})
    out = ROOT / "data/bench/corpus"
    if base_url is None:
        generate(out, "http://127.0.0.1:1", args.rows, seed=0, progress=False)
        return out / "site", None
    write_url_list(out, base_url)
    truth = load_ground_truth(out)
    ok = truth.filter(pc.is_null(truth.column("expected_ingest_reason")))
    return out / "site", ok


def _url_list(ok: pa.Table, work: Path, copies: int) -> str:
    urls, captions = ok.column("url").to_pylist(), ok.column("caption").to_pylist()
    table = pa.table({
        "url": [u if k == 0 else f"{u}?copy={k}" for k in range(copies) for u in urls],
        "caption": captions * copies,
    })  # fmt: skip
    path = work / "urls.parquet"
    pq.write_table(table, path)
    return str(path)


# -- quality ----------------------------------------------------------------------------


def _target(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    scale = size / (min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reference(source: bytes, size: int, mode: str) -> np.ndarray:
    """Full-resolution decode and a Lanczos resize of the whole image (then the crop): the careful way."""
    image = Image.open(io.BytesIO(source))
    image = (ImageOps.exif_transpose(image) or image).convert("RGB")
    w, h = _target(image.width, image.height, size, mode)
    image = image.resize((w, h), Image.Resampling.LANCZOS)
    if mode == "center_crop" and min(w, h) >= size:  # the centre square, as both tools crop it
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float64)


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


def _quality(args, mode: str, outputs: dict[str, str], ok: pa.Table, site: Path) -> dict:
    routes = load_routes(site)
    clean = [r for r in ok.to_pylist() if r.get("kind", "clean") == "clean" and routes[r["path"]].file]
    sample = random.Random(0).sample(clean, min(args.psnr_samples, len(clean)))
    by_tool = {tool: _images_by_url(out) for tool, out in outputs.items()}
    scores: dict[str, list[float]] = {tool: [] for tool in outputs}
    for row in sample:
        source = (site / routes[row["path"]].file).read_bytes()
        ref = _reference(source, args.image_size, mode)
        for tool, images in by_tool.items():
            if row["url"] in images:
                got = _content(images[row["url"]], ref.shape[:2], args.image_size, mode)
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


def _machine_limit(args, mode: str, ok: pa.Table, site: Path) -> dict:
    routes = load_routes(site)
    files = [routes[p].file for p in ok.column("path").to_pylist() if routes[p].file]
    blobs = [(site / f).read_bytes() for f in files[: args.limit_images]]
    cfg = ResizeConfig(image_size=args.image_size, resize_mode=mode, encode_quality=95)
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


def _ray_fixed_cost(args) -> dict:
    """bench.ray_fixed_cost in a fresh process, as a user's first ``ray.init`` would run."""
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "bench.ray_fixed_cost", "--num_cpus", str(args.processes)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_mode(args, mode: str, ours: list[str], url_list: str, urls: int, work: Path) -> tuple[list[dict], dict]:
    """Every tool ``--repeat`` times on one resize mode; returns the runs and each tool's last output."""
    runs, kept = [], {}
    for repeat in range(args.repeat):
        order = [*ours, "img2dataset"] if repeat % 2 == 0 else ["img2dataset", *reversed(ours)]
        for tool in order:
            out = str(work / f"out-{mode}-{tool}")
            shutil.rmtree(out, ignore_errors=True)
            log = str(work / f"{tool}-{mode}-{repeat}.log")
            server_cpu = _server_cpu_seconds()
            measured = run_measured(_command(args, tool, url_list, out, mode), log_path=log)
            server_cpu = _server_cpu_seconds() - server_cpu
            if measured.returncode != 0:
                raise SystemExit(f"{tool} failed (exit {measured.returncode}):\n{tail(log)}")
            count, successes = _successes(out)
            run = {"tool": tool, "resize_mode": mode, "repeat": repeat, "seconds": round(measured.seconds, 2),
                   "count": count, "successes": successes,
                   "samples_per_s": round(count / measured.seconds, 1),
                   "peak_rss_mib": round(measured.peak_rss_bytes / 2**20),
                   "cpu_s": round(measured.cpu_seconds, 1),
                   "cpu_ms_per_sample": round(1000 * measured.cpu_seconds / max(count, 1), 2),
                   "server_cpu_s": round(server_cpu, 1)}  # fmt: skip
            print(json.dumps(run), file=sys.stderr, flush=True)
            if count != urls:
                print(f"bench: {tool} counted {count} rows of {urls}", file=sys.stderr)
            runs.append(run)
            kept[tool] = out
    return runs, kept


def _mode_summary(mode: str, ours: list[str], runs: list[dict], quality: dict, limit: dict) -> dict:
    def of(tool: str) -> list[dict]:
        return [r for r in runs if r["tool"] == tool]

    def best(tool: str) -> dict:
        return max(of(tool), key=lambda r: r["samples_per_s"])

    def median_rate(tool: str) -> float:
        return statistics.median(r["samples_per_s"] for r in of(tool))

    tools = [*ours, "img2dataset"]
    return {
        "resize_mode": mode,
        "speed_ratio_median": {t: round(median_rate(t) / median_rate("img2dataset"), 2) for t in ours},
        "speed_ratio_best": {t: round(best(t)["samples_per_s"] / best("img2dataset")["samples_per_s"], 2)
                             for t in ours},
        "successes": {t: min(r["successes"] for r in of(t)) for t in tools},
        "cpu_ms_per_sample": {t: statistics.median(r["cpu_ms_per_sample"] for r in of(t)) for t in tools},
        "quality": quality,
        "machine_limit": limit,
        "share_of_limit": {t: round(best(t)["successes"] / best(t)["seconds"] / limit["images_per_s"], 2)
                           for t in ours},
    }  # fmt: skip


def main() -> int:
    args = _args()
    if not PEER.exists():
        print(f"{PEER} not found: run `bash bench/peers.sh` first", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    modes = args.resize_modes.split(",")
    ours = [f"webclip-{d}" for d in args.ours.split(",")]
    site, _ = _web(args, None)
    runs: list[dict] = []
    per_mode: list[dict] = []
    with serve(site) as base_url:
        _, ok = _web(args, base_url)
        url_list = _url_list(ok, work, args.copies)
        urls = ok.num_rows * args.copies
        print(f"bench: {urls} URLs of the {args.corpus} web on {base_url}", file=sys.stderr)
        outputs = {}
        for mode in modes:
            mode_runs, outputs[mode] = _run_mode(args, mode, ours, url_list, urls, work)
            runs += mode_runs
        for mode in modes:
            quality = _quality(args, mode, outputs[mode], ok, site)
            limit = _machine_limit(args, mode, ok, site)
            per_mode.append(_mode_summary(mode, ours, [r for r in runs if r["resize_mode"] == mode], quality, limit))
    summary = {
        "bench": "ingest_vs_img2dataset",
        "corpus": args.corpus, "urls": urls, "processes": args.processes, "threads": args.threads,
        "image_size": args.image_size, "repeat": args.repeat,
        "modes": per_mode,
        "ray_fixed_cost": None if args.no_ray_cost else _ray_fixed_cost(args),
        "runs": runs,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    save_result("ingest_vs_img2dataset", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
