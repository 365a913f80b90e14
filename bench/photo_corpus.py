"""A benchmark web of real photographs: thousands of distinct web-sized images, on loopback.

The demo web (``infra.local.corpus``) is synthetic scenes: flat colours and sharp
shapes, which decode and re-encode far more cheaply than photographs and flatter
every downloader. Speed figures against img2dataset are taken here instead, on real
photographs that ship inside well-known packages' wheels (matplotlib's sample data,
scikit-learn's sample images, scikit-image's data folder: the ``test`` extra), cut,
flipped, tinted and re-encoded the way the web serves photos:

- a random crop of 45-100% of each side (aspect ratios from 1:2 to 2:1), sometimes
  flipped, a colour tint and a gamma change; a few percent stay greyscale;
- rescaled (Lanczos) to a long side drawn log-uniformly from 320-2048 px, with a
  little sensor-like grain added (the sources are at most 1,411 px: without grain, an
  enlarged photo would be smoother, hence cheaper to decode, than a camera's);
- 94% JPEG at quality 80-95 (a quarter progressive, a quarter 4:4:4 chroma, the rest
  4:2:0), 3% PNG and 3% WebP (long side at most 1,024 px, as on the web).

Every image is a pure function of (seed, index), so the corpus does not depend on the
worker count; it is made in parallel processes with a progress bar and kept on disk:
``site/stamp.json`` records (format, count, seed) and a rerun with the same values
reuses it. The site is served by ``infra.local.webserver`` like the demo web::

    DIR/site/photos/000123.jpg|png|webp    the images
    DIR/site/routes.json                    path -> file and content type, for the server
    DIR/site/stamp.json                     what made it (format, count, seed)
    DIR/photos.parquet                      path, caption, source, format, width, height,
                                            quality, progressive, subsampling, bytes, sha256

``python -m bench.photo_corpus --out data/bench/photos [--count 10000]`` makes it alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

FORMAT = 1  # bump when the recipe changes: a cached corpus of another format is made again

# (package, folder inside it, file, caption subject): real photographs only, no plots or drawings.
SOURCES = (
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg", "a portrait of a naval officer"),
    ("sklearn", "datasets/images", "china.jpg", "a temple roof in china"),
    ("sklearn", "datasets/images", "flower.jpg", "a flower close up"),
    ("skimage", "data", "astronaut.png", "an astronaut with a flag"),
    ("skimage", "data", "chelsea.png", "a tabby cat"),
    ("skimage", "data", "coffee.png", "a cup of coffee"),
    ("skimage", "data", "rocket.jpg", "a rocket on the launch pad"),
    ("skimage", "data", "motorcycle_left.png", "a motorcycle in a garage"),
    ("skimage", "data", "motorcycle_right.png", "a motorcycle in a garage"),
    ("skimage", "data", "hubble_deep_field.jpg", "galaxies in deep space"),
    ("skimage", "data", "retina.jpg", "a photograph of a retina"),
    ("skimage", "data", "ihc.png", "stained tissue under a microscope"),
    ("skimage", "data", "camera.png", "a man with a camera on a tripod"),
    ("skimage", "data", "coins.png", "old coins on a table"),
    ("skimage", "data", "moon.png", "the surface of the moon"),
    ("skimage", "data", "brick.png", "a brick wall"),
    ("skimage", "data", "grass.png", "grass close up"),
    ("skimage", "data", "gravel.png", "gravel on the ground"),
)
MIN_LONG_SIDE, MAX_LONG_SIDE = 320, 2048
MAX_LOSSLESS_SIDE = 1024  # PNG and WebP long side
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class PhotoFacts:
    path: str  # URL path on the server, e.g. /photos/000123.jpg
    caption: str
    source: str
    format: str  # jpg, png, webp
    width: int
    height: int
    quality: int  # 0 for PNG
    progressive: bool
    subsampling: str  # 4:2:0 / 4:4:4 for JPEG, "" otherwise
    bytes: int
    sha256: str


def source_paths() -> list[Path]:
    """Where the source photos are in this environment; a clear error when a package is missing."""
    paths = []
    for package, folder, name, _ in SOURCES:
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or spec.origin is None:
            raise SystemExit(
                f"bench.photo_corpus needs the photos inside the {package!r} wheel: pip install -e '.[test]'"
            )
        path = Path(spec.origin).parent / folder / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: this {package} wheel does not ship {name}")
        paths.append(path)
    return paths


_SOURCE_IMAGES: dict[int, Image.Image] = {}


def _source(index: int, paths: list[Path]) -> Image.Image:
    if index not in _SOURCE_IMAGES:
        with Image.open(paths[index]) as image:
            _SOURCE_IMAGES[index] = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
    return _SOURCE_IMAGES[index]


def _long_side(rng: random.Random, lossless: bool) -> int:
    top = MAX_LOSSLESS_SIDE if lossless else MAX_LONG_SIDE
    return round(math.exp(rng.uniform(math.log(MIN_LONG_SIDE), math.log(top))))


def make_photo(site: str, seed: int, index: int) -> PhotoFacts:
    """Image ``index`` of the corpus: a pure function of (seed, index)."""
    rng = random.Random(f"photos:{seed}:{index}")
    paths = source_paths()
    which = rng.randrange(len(SOURCES))
    image = _source(which, paths)
    roll = rng.random()
    fmt = "png" if roll < 0.03 else "webp" if roll < 0.06 else "jpg"

    # cut: 45-100% of each side, anywhere
    w, h = image.size
    cw, ch = round(w * rng.uniform(0.45, 1.0)), round(h * rng.uniform(0.45, 1.0))
    cw, ch = min(cw, 2 * ch), min(ch, 2 * cw)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # rescale to a web size
    long_side = _long_side(rng, fmt != "jpg")
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    # tint, gamma and grain, in float, once
    grey = image.mode == "L" and rng.random() < 0.5  # half the grey sources stay grey
    pixels = np.asarray(image if grey else image.convert("RGB"), dtype=np.float32) / 255.0
    gamma = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    tint = np.array([rng.uniform(0.85, 1.15) for _ in range(1 if grey else 3)], dtype=np.float32)
    pixels = np.power(pixels, gamma) * (tint if not grey else tint[0]) * 255.0
    noise = np.random.default_rng([seed, index]).standard_normal(pixels.shape, dtype=np.float32)
    pixels += noise * rng.uniform(0.8, 2.5)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "L" if grey else "RGB")

    options: dict = {}
    quality, progressive, subsampling = 0, False, ""
    if fmt == "jpg":
        quality = rng.randint(80, 95)
        progressive = rng.random() < 0.25
        subsampling = "4:4:4" if rng.random() < 0.25 else "4:2:0"
        options = {"quality": quality, "progressive": progressive, "optimize": progressive,
                   "subsampling": 0 if subsampling == "4:4:4" else 2}  # fmt: skip
    elif fmt == "webp":
        quality = rng.randint(75, 92)
        options = {"quality": quality, "method": 4}
    else:
        options = {"compress_level": 6}
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **options)
    data = buffer.getvalue()
    name = f"photos/{index:06d}.{fmt}"
    target = Path(site) / name
    target.write_bytes(data)
    subject = SOURCES[which][3]
    return PhotoFacts(
        path="/" + name, caption=f"{subject}, photo {index}", source=paths[which].name, format=fmt,
        width=image.width, height=image.height, quality=quality, progressive=progressive,
        subsampling=subsampling, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )  # fmt: skip


def _make_one(args: tuple[str, int, int]) -> PhotoFacts:
    return make_photo(*args)


def _stamp(count: int, seed: int) -> dict:
    return {"format": FORMAT, "count": count, "seed": seed}


def generate_photos(out_dir: str | os.PathLike, count: int = 10_000, seed: int = 0,
                    workers: int | None = None, progress: bool = True) -> pa.Table:
    """Make (or reuse) the photo corpus in ``out_dir``; returns its table (``photos.parquet``)."""
    if count < 1:
        raise ValueError(f"count={count}: must be at least 1")
    out = Path(out_dir)
    site, table_path = out / "site", out / "photos.parquet"
    try:
        if json.loads((site / "stamp.json").read_text()) == _stamp(count, seed) and table_path.is_file():
            return pq.read_table(table_path)
    except (OSError, ValueError):
        pass
    source_paths()  # a missing package fails here, once, with its message
    staging = out / ".site.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "photos").mkdir(parents=True)
    jobs = [(str(staging), seed, i) for i in range(count)]
    workers = workers or os.cpu_count() or 1
    facts: list[PhotoFacts] = []
    with tqdm(total=count, desc="making photo corpus", unit="image", disable=not progress, file=sys.stderr) as bar:
        if workers == 1:
            results = map(_make_one, jobs)
        else:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_make_one, jobs, chunksize=8)
        for fact in results:
            facts.append(fact)
            bar.update()
        if workers != 1:
            pool.close()
            pool.join()
    routes = {f.path: {"file": f.path[1:], "content_type": CONTENT_TYPES[f.format]} for f in facts}
    (staging / "routes.json").write_text(json.dumps(routes, indent=0))
    table = pa.Table.from_pylist([asdict(f) for f in facts])
    pq.write_table(table, table_path)
    (staging / "stamp.json").write_text(json.dumps(_stamp(count, seed)))
    shutil.rmtree(site, ignore_errors=True)
    os.replace(staging, site)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.photo_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/bench/photos", help="folder for site/ and photos.parquet")
    p.add_argument("--count", type=int, default=10_000, help="images to make")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    args = p.parse_args(argv)
    started = time.monotonic()
    table = generate_photos(args.out, args.count, args.seed, args.workers or None)
    formats = dict(zip(*np.unique(table.column("format").to_numpy(zero_copy_only=False), return_counts=True)))
    print(json.dumps({"images": table.num_rows, "formats": {k: int(v) for k, v in formats.items()},
                      "bytes": int(sum(table.column("bytes").to_pylist())),
                      "seconds": round(time.monotonic() - started, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
