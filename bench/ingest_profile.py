"""Where ingest's CPU goes per image, on the real-photo web: one table, step by step.

    .venv/bin/python -m bench.ingest_profile [--images 2000] [--image_size 256] \
        [--resize_modes border,center_crop] [--threads 32]

All in this one process, on the photo corpus (``bench.photo_corpus``) served on
127.0.0.1 by ``infra.local.webserver`` (the server's own CPU is another process's
and not counted). CPU time is this process's (``time.process_time``: every thread),
so figures hold on a busy machine; per image = CPU seconds / images.

- ``shard``: the real thing, ``ingest.shard_worker.download_shard`` on ``--images``
  URLs (fetch, hash, decode thread, reorder buffer, tar + parquet writer), the whole
  per-image cost of one worker process;
- ``fetch``: the ``Fetcher`` alone, ``--threads`` requests in flight, bodies dropped
  (HTTP client, safety checks, the event loop's share);
- ``sha256``: the hash the pool stores, over the fetched bytes;
- ``resize_image`` and its steps: ``ingest.resizer.resize_image`` over the same
  bytes, timed as a whole, then once under cProfile to split it into the calls it
  makes (header, decode, convert, resize, pHash, crop/border, encode) — shares of the
  profiled run applied to the unprofiled total;
- ``write``: the webdataset shard writer (``core.shard_writer``) given the resized
  images: tar members, parquet, stats, commit;
- ``rest``: shard minus the parts: the reorder buffer, the thread hand-off, asyncio
  scheduling beyond the fetch loop.

Ray's share is not here: it is a fixed cost per run (``bench.ray_fixed_cost``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import save_result
from bench.ingest_vs_img2dataset import PHOTOS
from bench.photo_corpus import generate_photos
from core.shard_writer import open_shard_writer
from infra.local.webserver import serve
from ingest import resizer
from ingest.config import IngestConfig
from ingest.fetcher import Fetcher
from ingest.reader import ShardInput
from ingest.resizer import resize_image
from ingest.shard_worker import download_shard

ROOT = Path(__file__).resolve().parent.parent

# resize_image's direct callees, by (file suffix, function name) -> step
STEPS = {
    ("PIL/Image.py", "open"): "header",
    ("PIL/Image.py", "getexif"): "header",
    ("PIL/JpegImagePlugin.py", "draft"): "header",
    ("PIL/ImageFile.py", "load"): "decode",
    ("PIL/ImageOps.py", "exif_transpose"): "convert",
    ("ingest/resizer.py", "_to_rgb"): "convert",
    ("PIL/Image.py", "resize"): "resize",
    ("PIL/Image.py", "reduce"): "resize",
    ("ingest/resizer.py", "_resize"): "resize",
    ("ingest/resizer.py", "perceptual_signature"): "phash",
    ("ingest/resizer.py", "_resize_center_crop"): "resize",
    ("ingest/resizer.py", "_finish_geometry"): "crop/border",  # the code before issue 20
    ("ingest/resizer.py", "_add_border"): "crop/border",
    ("PIL/Image.py", "save"): "encode",
}


def _cpu(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


async def _fetch_all(cfg: IngestConfig, urls: list[str]) -> list[bytes]:
    gate = asyncio.Semaphore(cfg.thread_count)
    async with Fetcher(cfg.fetch_config(), cfg.network_policy()) as fetcher:
        async def one(url: str) -> bytes:
            async with gate:
                return (await fetcher.fetch(url)).data

        return await asyncio.gather(*(one(u) for u in urls))


def _split_resize(blobs: list[bytes], rcfg: resizer.ResizeConfig) -> dict[str, float]:
    """Shares of resize_image's profiled time, by step."""
    profile = cProfile.Profile()
    profile.enable()
    for data in blobs:
        resize_image(data, rcfg)
    profile.disable()
    stats = pstats.Stats(profile).stats
    shares: dict[str, float] = {}
    caller = next(k for k in stats if k[0].endswith("ingest/resizer.py") and k[2] == "resize_image")
    total = stats[caller][3]
    for func, (_, _, _, _, callers) in stats.items():
        if caller not in callers:
            continue
        step = next((v for (suffix, name), v in STEPS.items() if func[0].endswith(suffix) and func[2] == name), "other")
        shares[step] = shares.get(step, 0.0) + callers[caller][3] / total
    shares["other"] = max(0.0, 1.0 - sum(v for k, v in shares.items() if k != "other"))
    return shares


def profile_mode(args, mode: str, urls: list[str], work: Path) -> dict:
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = IngestConfig(url_list="unused", output_folder=str(out), image_size=args.image_size, resize_mode=mode,
                       thread_count=args.threads, number_sample_per_shard=len(urls),
                       allow_networks=["127.0.0.1/32"])  # fmt: skip
    n = len(urls)
    ms = {}
    # the whole shard, twice: the first warms the server's page cache and the imports
    shard = ShardInput(0, urls, [f"caption {i}" for i in range(n)], {})
    download_shard(shard, cfg)
    shutil.rmtree(out)
    stats, cpu = _cpu(download_shard, shard, cfg)
    assert stats["successes"] == n, stats
    ms["shard"] = cpu
    blobs, ms["fetch"] = _cpu(lambda: asyncio.run(_fetch_all(cfg, urls)))
    _, ms["sha256"] = _cpu(lambda: [hashlib.sha256(b).hexdigest() for b in blobs])
    rcfg = cfg.resize_config()
    images, ms["resize_image"] = _cpu(lambda: [resize_image(b, rcfg) for b in blobs])
    shares = _split_resize(blobs, rcfg)

    def write() -> None:
        writer = open_shard_writer("webdataset", str(work / f"w-{mode}"), 0, "jpg", [])
        for i, image in enumerate(images):
            row = {"status": "success", "key": f"{i:09d}", "url": urls[i], "caption": f"caption {i}",
                   "sha256": hashlib.sha256(blobs[i]).hexdigest(), "width": image.width, "height": image.height,
                   "original_width": image.original_width, "original_height": image.original_height,
                   "phash": image.phash, "luma_std": image.luma_std}  # fmt: skip
            writer.add(row, image.data)
        writer.commit({"count": n, "successes": n})

    _, ms["write"] = _cpu(write)
    per_image = {k: round(1000 * v / n, 3) for k, v in ms.items()}
    steps = {k: round(per_image["resize_image"] * v, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}
    parts = per_image["fetch"] + per_image["sha256"] + per_image["resize_image"] + per_image["write"]
    per_image["rest"] = round(per_image["shard"] - parts, 3)
    return {"resize_mode": mode, "images": n, "cpu_ms_per_image": per_image, "resize_image_steps_ms": steps,
            "bytes_per_image": round(sum(map(len, blobs)) / n)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images of the photo corpus to profile on")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--resize_modes", default="border,center_crop")
    p.add_argument("--threads", type=int, default=32)
    args = p.parse_args(argv)
    photos = generate_photos(ROOT / "data/bench/photos", max(args.images, PHOTOS), seed=0)
    paths = photos.column("path").to_pylist()[: args.images]
    results = []
    with tempfile.TemporaryDirectory(prefix="ingest-profile-") as tmp, serve(ROOT / "data/bench/photos/site") as base:
        urls = [base + path for path in paths]
        for mode in args.resize_modes.split(","):
            results.append(profile_mode(args, mode, urls, Path(tmp)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    save_result("ingest_profile", {"bench": "ingest_profile", "modes": results, "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
