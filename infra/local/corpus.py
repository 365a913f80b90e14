"""The embedded demo corpus: a deterministic synthetic web, with its mess planted.

Every stage is tested end to end against this corpus instead of the real web: the
ingest stage downloads it from a real HTTP server on loopback
(``infra.local.webserver``), the filter stage decides on it, and the trainer learns
the scene world from it. Because we planted every defect ourselves, at known rates,
the ground truth says what each stage must do with each row, so tests can check the
pipeline's decisions row by row rather than eyeballing totals.

Outputs (``generate(out_dir, ...)`` or ``python -m infra.local.corpus --out DIR``)::

    DIR/site/                 what the server serves (images, pages) + routes.json + stamp.json
    DIR/crawl_*.parquet       the crawler's ground truth for the HTML pages (see ``infra.local.pages``)
    DIR/urls.parquet          the input URL list: columns url, caption (list order)
    DIR/ground_truth.parquet  per URL-list row: what was planted and what must happen
    DIR/corpus.json           summary: counts per kind, rates, held-out pairs

``site/routes.json`` maps a URL path to how the server answers it::

    {"/img/000123.jpg": {"file": "img/000123.jpg", "status": 200,
                         "content_type": "image/jpeg", "headers": {}, "delay_s": 0,
                         "trickle": false, "truncate_to": null, "location": null}}

- ``file``: body, relative to ``site/``; null sends a short HTML status page.
- ``status``, ``content_type``, ``headers``: sent as given.
- ``delay_s``: seconds to wait before the headers; with ``trickle`` the headers go at
  once and the body trickles (100 bytes every 0.5 s) for ``delay_s`` seconds, after
  which the rest is sent: a slow server, not a dead one.
- ``truncate_to``: announce the full Content-Length, send this many bytes, close.
- ``location``: the redirect target (with a 3xx status); ``{port}`` in it is
  replaced by the server's port, so the site survives a change of port.

In the ground truth, ``kind`` names what was planted (see ``KIND_RATES``),
``expected_ingest_reason`` is null where the download must succeed (at ingest's
defaults, a repeated URL and caption is ``dup_url`` and a junk caption
``caption_missing`` / ``caption_boilerplate`` / ``caption_short`` before any
request), and ``expected_filter_reason`` is the first failing check of the thin
filter at its defaults, walking the list in order: the ingest reason, ``dup_url``,
``caption_missing`` / ``caption_short``, ``too_small``, ``aspect_ratio``, then
``dup_exact`` (bytes already kept). Mismatched captions and near duplicates pass it
on purpose: later filters (CLIP score, perceptual hash) are for them, and ``group``
names a duplicate's original, which always comes first in the list.

The URL list holds ``base_url + path``. The port can differ between runs, so the
site itself never contains the base URL, ``write_url_list`` rewrites only the two
parquet files, and ``generate`` re-renders only when ``site/stamp.json`` says the
site was made with other (rows, seed, slow_delay) or by another corpus format.

Determinism: every row draws from its own ``random.Random(f"{seed}:{item}")`` and
every image is a pure function of its job, so the output bytes do not depend on the
worker count or on completion order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from core.reasons import Reason, SampleError, Stage
from filter.config import FilterConfig
from infra.local import pages, scenes
from ingest.resizer import ResizeConfig, resize_image

# Bump when the generator's output changes for the same (rows, seed, slow_delay):
# stale sites are then re-rendered instead of silently reused.
# 4: HTML pages and robots.txt for the crawler (infra.local.pages); 5: scenes carry a light field;
# 6: dup_url and caption_junk rows fail before download (ingest.plan), more junk captions;
CORPUS_FORMAT = 7  # 7: the held-out pairs are a 2 x 3 block (infra.local.scenes)

# Planted defects, as fractions of all rows; "clean" takes the rest (about 49%).
# "mismatch" is about 19% of the rows whose download yields a scene image.
KIND_RATES: dict[str, float] = {
    "mismatch": 0.15,  # caption names another (seen) colour/shape pair
    "dup_exact": 0.05,  # same bytes as an earlier original, other URL
    "dup_near": 0.05,  # same scene, re-encoded / resized / slightly cropped
    "dup_url": 0.02,  # an earlier row's URL and caption, repeated
    "tiny": 0.02,  # 16-40 px on both sides
    "aspect": 0.02,  # a banner: aspect ratio >= 6
    "placeholder": 0.02,  # the one "image not found" picture, many URLs
    "caption_junk": 0.02,  # "", "image", "IMG_2931.JPG", "sunset", ... (see JUNK_CAPTIONS)
    "http_404": 0.02,
    "http_500": 0.01,  # 500, 502 or 503
    "slow": 0.01,  # headers at once, then a trickle for slow_delay seconds
    "truncated": 0.01,  # full Content-Length announced, half sent
    "not_image": 0.01,  # an HTML page
    "corrupt": 0.01,  # image/jpeg, garbage bytes
    "noai": 0.01,  # X-Robots-Tag: noai, noimageai
    "redirect_ok": 0.02,  # 3xx to an image elsewhere on the site
    "redirect_loop": 0.005,  # a redirect cycle of 2-15 hops
    "redirect_blocked": 0.005,  # 302 to 127.0.0.2: loopback, but outside 127.0.0.1/32
}
KINDS: tuple[str, ...] = ("clean", *KIND_RATES)
DUPLICATE_KINDS = ("dup_exact", "dup_near", "dup_url")  # each refers to an earlier clean original
# From this many rows on, every kind is planted at least once.
MIN_ROWS_FOR_EVERY_KIND = 100

# What ingest records, at its defaults, for each kind. Two kinds fail before download
# (ingest.plan): dup_url, and caption_junk, whose reason depends on the caption
# (JUNK_CAPTIONS; None here, see expected_ingest_reason).
EXPECTED_INGEST_REASON: dict[str, Reason | None] = {
    **{kind: None for kind in KINDS},
    "dup_url": Reason.DUP_URL,
    "http_404": Reason.HTTP_404,
    "http_500": Reason.HTTP_5XX,
    "slow": Reason.TIMEOUT,
    "truncated": Reason.TRUNCATED,
    "not_image": Reason.NOT_IMAGE,
    "corrupt": Reason.DECODE_ERROR,
    "noai": Reason.OPT_OUT,
    "redirect_loop": Reason.TOO_MANY_REDIRECTS,
    "redirect_blocked": Reason.SSRF_BLOCKED,
}

# expected_filter_reason is computed here, independently of filter/ (it is the test
# oracle), against the filter's default thresholds, read from its config.
_FILTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FilterConfig)}
FILTER_MIN_SIDE: int = _FILTER_DEFAULTS["min_image_size"]
FILTER_MAX_ASPECT: float = _FILTER_DEFAULTS["max_aspect_ratio"]
FILTER_MIN_CAPTION_CHARS: int = _FILTER_DEFAULTS["min_caption_chars"]
FILTER_MIN_CAPTION_WORDS: int = _FILTER_DEFAULTS["min_caption_words"]

DEFAULT_SLOW_DELAY_S = 8.0
JPEG_QUALITY_RANGE = (70, 95)
BLOCKED_HOST = "127.0.0.2"
PLACEHOLDER_FILE = "img/placeholder.jpg"
# Junk captions ({n}: a random number) and the reason ingest gives each at its defaults
# (>= 5 characters, >= 2 words, boilerplate rejected): the oracle, written by hand.
JUNK_CAPTIONS: dict[str, Reason] = {
    "": Reason.CAPTION_MISSING,
    " ": Reason.CAPTION_MISSING,
    "image": Reason.CAPTION_BOILERPLATE,
    "photo": Reason.CAPTION_BOILERPLATE,
    "untitled": Reason.CAPTION_BOILERPLATE,
    "thumbnail": Reason.CAPTION_BOILERPLATE,
    "Click here!": Reason.CAPTION_BOILERPLATE,  # two words: boilerplate, not short
    "IMG_{n}.JPG": Reason.CAPTION_BOILERPLATE,
    "DSC_{n}.jpg": Reason.CAPTION_BOILERPLATE,
    "image{n}": Reason.CAPTION_BOILERPLATE,
    "sunset": Reason.CAPTION_SHORT,  # one word
    "ok": Reason.CAPTION_SHORT,  # two characters
}

STAMP_NAME = "stamp.json"
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("kind", pa.string()),
        ("image_colour", pa.string()),
        ("image_shape", pa.string()),
        ("caption_colour", pa.string()),
        ("caption_shape", pa.string()),
        ("group", pa.string()),
        ("expected_ingest_reason", pa.string()),
        ("expected_filter_reason", pa.string()),
        # Of the bytes a successful download returns; null when it must fail.
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
URL_LIST_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string())])


# -- the plan: what every row is, before any pixel is drawn ---------------------------


@dataclass(frozen=True)
class FileJob:
    """One file of the site, described completely enough to make it anywhere."""

    file: str  # relative to site/
    recipe: str  # "scene" | "placeholder" | "corrupt" | "html"
    scene: scenes.Scene | None = None
    quality: int = 90
    scale: float = 1.0  # resize factor after rendering
    crop: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # fraction off left, top, right, bottom
    seed: int = 0
    text: str = ""


@dataclass(frozen=True)
class FileFacts:
    file: str
    sha256: str
    size: int
    width: int | None  # None when the bytes are not an image
    height: int | None


@dataclass
class PlannedRow:
    item: int  # generation index: names the row's files, independent of list order
    kind: str
    path: str
    caption: str
    scene: scenes.Scene | None = None  # what the served image shows, if any
    caption_pair: tuple[str, str] | None = None
    original: "PlannedRow | None" = None  # for dup_exact / dup_near / dup_url
    served_file: str | None = None  # the file a successful download returns
    junk_template: str | None = None  # caption_junk: the JUNK_CAPTIONS entry its caption came from
    routes: dict[str, dict] = field(default_factory=dict)
    jobs: list[FileJob] = field(default_factory=list)


def _route(file: str | None = None, **overrides) -> dict:
    route = {
        "file": file,
        "status": 200,
        "content_type": "image/jpeg" if file else "text/html",
        "headers": {},
        "delay_s": 0,
        "trickle": False,
        "truncate_to": None,
        "location": None,
    }
    route.update(overrides)
    return route


def _kind_sequence(rows: int, seed: int) -> list[str]:
    """Each kind at its rate (exact counts, not coin flips), in a seeded order."""
    counts = {kind: round(rate * rows) for kind, rate in KIND_RATES.items()}
    if rows >= MIN_ROWS_FOR_EVERY_KIND:
        counts = {kind: max(1, n) for kind, n in counts.items()}
    for kind in sorted(counts, key=counts.get, reverse=True):  # tiny corpora: never more than rows
        excess = sum(counts.values()) - rows
        if excess <= 0:
            break
        counts[kind] -= min(excess, counts[kind])
    counts["clean"] = rows - sum(counts.values())
    if counts["clean"] == 0:  # duplicates need a clean original
        for kind in DUPLICATE_KINDS:
            counts["clean"] += counts[kind]
            counts[kind] = 0
    sequence = [kind for kind in KINDS for _ in range(counts[kind])]
    random.Random(f"{seed}:kinds").shuffle(sequence)
    return sequence


def _plan_row(item: int, kind: str, seed: int, slow_delay: float, originals: list[PlannedRow]) -> PlannedRow:
    """One row, from its own RNG: its URL path, caption, content, routes and files."""
    rng = random.Random(f"{seed}:{item}")
    row = PlannedRow(item=item, kind=kind, path=f"/img/{item:06d}.jpg", caption="")
    if kind in DUPLICATE_KINDS:
        _plan_duplicate(row, rng, originals)
    else:
        _plan_fresh(row, rng, slow_delay)
    return row


def _plan_duplicate(row: PlannedRow, rng: random.Random, originals: list[PlannedRow]) -> None:
    original = originals[rng.randrange(len(originals))]
    row.original, row.scene, row.caption_pair = original, original.scene, original.scene.pair
    if row.kind == "dup_url":
        row.path, row.caption, row.served_file = original.path, original.caption, original.served_file
        return
    row.caption = scenes.caption(original.scene, rng)
    if row.kind == "dup_exact":
        row.served_file = original.served_file
    else:
        row.served_file = row.path.lstrip("/")
        row.jobs.append(_near_duplicate_job(row.served_file, original.jobs[0], rng))
    row.routes[row.path] = _route(row.served_file)


def _scene_dimensions(kind: str, rng: random.Random) -> tuple[int, int] | None:
    if kind == "tiny":  # both sides 16-40 px, aspect ratio at most 2
        width = rng.randint(16, 40)
        return width, rng.randint(max(16, math.ceil(width / 2)), min(40, 2 * width))
    if kind == "aspect":  # banners, sometimes skyscrapers: short side >= 80, ratio >= 6
        short = rng.randint(80, 200)
        long = min(1600, math.ceil(short * rng.uniform(6.0, 10.0)))
        return (long, short) if rng.random() < 0.8 else (short, long)
    return None  # a web size


def _plan_fresh(row: PlannedRow, rng: random.Random, slow_delay: float) -> None:
    """Every kind but the duplicates: a new scene, even where no image will be served."""
    kind, path, name = row.kind, row.path, f"{row.item:06d}"
    file = path.lstrip("/")
    scene = scenes.sample_scene(rng, dimensions=_scene_dimensions(kind, rng))
    row.caption, row.caption_pair = scenes.caption(scene, rng), scene.pair
    image_job = FileJob(file, "scene", scene=scene, quality=rng.randint(*JPEG_QUALITY_RANGE))

    if kind in ("clean", "mismatch", "caption_junk", "tiny", "aspect", "noai", "slow", "truncated"):
        row.scene, row.served_file = scene, file
        row.jobs.append(image_job)
        extra = {
            "noai": {"headers": {"X-Robots-Tag": "noai, noimageai"}},
            "slow": {"trickle": True, "delay_s": slow_delay},
            "truncated": {"truncate_to": "half"},  # resolved once the file's size is known
        }.get(kind, {})
        row.routes[path] = _route(file, **extra)
        if kind == "mismatch":
            others = [pair for pair in scenes.SEEN_CLASSES if pair != scene.pair]
            row.caption_pair = others[rng.randrange(len(others))]
            claimed = dataclasses.replace(scene, colour=row.caption_pair[0], shape=row.caption_pair[1])
            row.caption = scenes.caption(claimed, rng)
        elif kind == "caption_junk":
            row.junk_template = rng.choice(list(JUNK_CAPTIONS))
            row.caption = row.junk_template.format(n=rng.randint(1000, 9999))
            row.caption_pair = None
    elif kind == "placeholder":  # the caption describes a scene that is not there
        row.served_file = PLACEHOLDER_FILE
        row.routes[path] = _route(PLACEHOLDER_FILE)
    elif kind == "http_404":
        row.routes[path] = _route(None, status=404)
    elif kind == "http_500":
        row.routes[path] = _route(None, status=rng.choice((500, 500, 502, 503)))
    elif kind == "not_image":  # an image URL answering with a web page, as hotlink guards do
        page = f"pages/{name}.html"
        row.jobs.append(FileJob(page, "html", text=row.caption))
        row.routes[path] = _route(page, content_type="text/html; charset=utf-8")
    elif kind == "corrupt":
        row.jobs.append(FileJob(file, "corrupt", seed=rng.getrandbits(32)))
        row.routes[path] = _route(file)
    elif kind in ("redirect_ok", "redirect_blocked"):
        target = f"cdn/{name}.jpg"
        row.scene = scene
        row.jobs.append(dataclasses.replace(image_job, file=target))
        row.routes["/" + target] = _route(target)
        if kind == "redirect_ok":
            row.served_file = target
            row.routes[path] = _route(None, status=rng.choice((301, 302, 302, 307)), location="/" + target)
        else:  # the port is the server's own, filled in when it answers
            row.routes[path] = _route(None, status=302, location=f"http://{BLOCKED_HOST}:{{port}}/{target}")
    elif kind == "redirect_loop":  # a cycle of 2-15 hops: a loop, and sometimes a long chain too
        hops = [path] + [f"/go/{name}/{k}" for k in range(1, rng.randint(2, 15))]
        for k, hop in enumerate(hops):
            row.routes[hop] = _route(None, status=302, location=hops[(k + 1) % len(hops)])
    else:  # pragma: no cover - KINDS is closed
        raise ValueError(f"unknown kind {kind!r}")


def _near_duplicate_job(file: str, original: FileJob, rng: random.Random) -> FileJob:
    """The original's scene, changed the way re-uploads change it: never the same bytes."""
    how = rng.choice(("requality", "resize", "crop"))
    low, high = JPEG_QUALITY_RANGE
    quality = rng.choice([q for q in range(low, high + 1) if abs(q - original.quality) >= 5])
    if how == "requality":
        return dataclasses.replace(original, file=file, quality=quality)
    if how == "resize":
        return dataclasses.replace(original, file=file, scale=round(rng.uniform(0.5, 0.9), 3))
    crop = tuple(round(rng.uniform(0.005, 0.05), 4) for _ in range(4))
    return dataclasses.replace(original, file=file, crop=crop)


def plan_corpus(rows: int, seed: int, slow_delay: float) -> list[PlannedRow]:
    """Every row of the corpus, in URL-list order; pure and cheap (nothing rendered)."""
    kinds = _kind_sequence(rows, seed)
    planned: list[PlannedRow | None] = [None] * rows
    for item, kind in enumerate(kinds):  # originals first: duplicates refer to them
        if kind not in DUPLICATE_KINDS:
            planned[item] = _plan_row(item, kind, seed, slow_delay, [])
    originals = [row for row in planned if row is not None and row.kind == "clean"]
    for item, kind in enumerate(kinds):
        if kind in DUPLICATE_KINDS:
            planned[item] = _plan_row(item, kind, seed, slow_delay, originals)

    order = list(range(rows))
    random.Random(f"{seed}:order").shuffle(order)
    position = {item: pos for pos, item in enumerate(order)}
    groups: dict[int, list[int]] = {}
    for row in planned:
        if row.original is not None:
            groups.setdefault(row.original.item, []).append(row.item)
    for original, duplicates in groups.items():  # the original takes its group's first slot
        first = min(duplicates, key=position.__getitem__)
        if position[first] < position[original]:
            position[first], position[original] = position[original], position[first]
            order[position[first]], order[position[original]] = first, original
    return [planned[item] for item in order]


# -- making the files: pure functions of a job, run in a process pool ----------------


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _scene_bytes(job: FileJob) -> bytes:
    image = scenes.render(job.scene)
    if any(job.crop):
        w, h = image.size
        left, top, right, bottom = job.crop
        image = image.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
    if job.scale != 1.0:
        size = (max(1, round(image.width * job.scale)), max(1, round(image.height * job.scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return _encode_jpeg(image, job.quality)


def _placeholder_bytes() -> bytes:
    """The grey "image not found" box that image hosts serve for deleted files."""
    image = Image.new("RGB", (480, 360), (204, 204, 204))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 471, 351), outline=(150, 150, 150), width=4)
    draw.rectangle((200, 110, 280, 170), outline=(120, 120, 120), width=5)  # a little picture icon
    draw.polygon([(208, 162), (232, 130), (252, 152), (264, 140), (272, 162)], fill=(120, 120, 120))
    if features.check("freetype2"):
        font = ImageFont.load_default(size=34)
        draw.text((240, 230), "image not found", fill=(90, 90, 90), font=font, anchor="mm")
    else:  # a Pillow without FreeType: the small bitmap font, centred by hand
        draw.text((195, 225), "image not found", fill=(90, 90, 90))
    return _encode_jpeg(image, 85)


def _corrupt_bytes(seed: int) -> bytes:
    """Garbage served as image/jpeg, checked to fail the same decode path ingest uses."""
    rng = random.Random(seed)
    probe = ResizeConfig(image_size=64)
    while True:
        garbage = rng.randbytes(rng.randint(2_000, 20_000))
        if rng.random() < 0.5:
            garbage = b"\xff\xd8\xff\xe0" + garbage  # looks like a JPEG for four bytes
        try:
            resize_image(garbage, probe)
        except SampleError as error:
            if error.reason is Reason.DECODE_ERROR:
                return garbage


def _html_bytes(text: str) -> bytes:
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Gallery</title></head>\n"
        f"<body><h1>Gallery</h1><p>{escaped}</p><p>Sign in to view the full-size image.</p></body></html>\n"
    ).encode()


def make_file(site_dir: str, job: FileJob) -> FileFacts:
    """Write one site file; returns what the ground truth needs to know about it."""
    if job.recipe == "scene":
        data = _scene_bytes(job)
    elif job.recipe == "placeholder":
        data = _placeholder_bytes()
    elif job.recipe == "corrupt":
        data = _corrupt_bytes(job.seed)
    elif job.recipe == "html":
        data = _html_bytes(job.text)
    else:  # pragma: no cover - recipes are closed
        raise ValueError(f"unknown recipe {job.recipe!r}")
    path = Path(site_dir) / job.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    width = height = None
    if job.recipe in ("scene", "placeholder"):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    return FileFacts(job.file, hashlib.sha256(data).hexdigest(), len(data), width, height)


def _make_files(site_dir: Path, jobs: list[FileJob], workers: int, progress: bool) -> dict[str, FileFacts]:
    work = partial(make_file, str(site_dir))
    bar = tqdm(total=len(jobs), desc="rendering corpus", unit="file", disable=not progress)
    facts: dict[str, FileFacts] = {}
    with bar:
        if workers <= 1:
            results = map(work, jobs)
            for fact in results:
                facts[fact.file] = fact
                bar.update()
        else:
            chunksize = max(1, min(32, len(jobs) // (workers * 8)))
            with multiprocessing.get_context().Pool(workers) as pool:
                for fact in pool.imap_unordered(work, jobs, chunksize=chunksize):
                    facts[fact.file] = fact
                    bar.update()
    return facts


# -- what must happen to each row ----------------------------------------------------


def expected_ingest_reason(row: PlannedRow) -> Reason | None:
    """What ingest must record for ``row`` at its defaults; None: the download succeeds."""
    if row.kind == "caption_junk":
        return JUNK_CAPTIONS[row.junk_template]
    return EXPECTED_INGEST_REASON[row.kind]


def caption_reason(caption: str) -> Reason | None:
    """The thin filter's caption check (defaults: >= 5 characters and >= 2 words)."""
    text = caption.strip()
    if not text:
        return Reason.CAPTION_MISSING
    if len(text) < FILTER_MIN_CAPTION_CHARS or len(text.split()) < FILTER_MIN_CAPTION_WORDS:
        return Reason.CAPTION_SHORT
    return None


def _expected_filter_reasons(rows: list[PlannedRow], facts: dict[str, FileFacts]) -> list[Reason | None]:
    """The first failing check, in the thin filter's order, walking the list in order."""
    seen_paths: set[str] = set()
    kept_hashes: set[str] = set()
    reasons: list[Reason | None] = []
    for row in rows:
        reason = expected_ingest_reason(row)
        if reason is None:
            fact = facts[row.served_file]
            if row.path in seen_paths:
                reason = Reason.DUP_URL
            elif (caption_problem := caption_reason(row.caption)) is not None:
                reason = caption_problem
            elif min(fact.width, fact.height) < FILTER_MIN_SIDE:
                reason = Reason.TOO_SMALL
            elif max(fact.width, fact.height) / min(fact.width, fact.height) > FILTER_MAX_ASPECT:
                reason = Reason.ASPECT_RATIO
            elif fact.sha256 in kept_hashes:
                reason = Reason.DUP_EXACT
            else:
                kept_hashes.add(fact.sha256)
        seen_paths.add(row.path)
        reasons.append(reason)
    return reasons


def _groups(rows: list[PlannedRow]) -> list[str | None]:
    """The original's path for duplicates (placeholders: the first placeholder's)."""
    first_placeholder: str | None = None
    groups: list[str | None] = []
    for row in rows:
        if row.original is not None:
            groups.append(row.original.path)
        elif row.kind == "placeholder":
            groups.append(first_placeholder)
            first_placeholder = first_placeholder or row.path
        else:
            groups.append(None)
    return groups


_WORD = re.compile(r"[a-z]+")


def _check_no_held_out(rows: list[PlannedRow]) -> None:
    """Refuse to write a corpus in which a held-out pair shows up anywhere."""
    for row in rows:
        words = set(_WORD.findall(row.caption.lower()))
        named = {(c, s) for c, s in scenes.HELD_OUT_PAIRS if c in words and s in words}
        pairs = {row.scene.pair if row.scene else None, row.caption_pair} | named
        leaked = pairs & scenes.HELD_OUT_PAIRS
        if leaked:
            raise RuntimeError(f"held-out pair {sorted(leaked)} in row {row.item} ({row.kind}): generator bug")


def _check_duplicates(rows: list[PlannedRow], facts: dict[str, FileFacts]) -> None:
    for row in rows:
        if row.kind == "dup_near" and facts[row.served_file].sha256 == facts[row.original.served_file].sha256:
            raise RuntimeError(f"near duplicate {row.path} has its original's bytes: generator bug")


def _ground_truth_table(rows: list[PlannedRow], facts: dict[str, FileFacts], base_url: str) -> pa.Table:
    def reason_value(reason: Reason | None) -> str | None:
        return reason.value if reason is not None else None

    # Facts about what a successful download returns; rows that must fail have none.
    served = [facts[r.served_file] if expected_ingest_reason(r) is None else None for r in rows]
    columns = {
        "row": list(range(len(rows))),
        "path": [r.path for r in rows],
        "url": [_join_url(base_url, r.path) for r in rows],
        "caption": [r.caption for r in rows],
        "kind": [r.kind for r in rows],
        "image_colour": [r.scene.colour if r.scene else None for r in rows],
        "image_shape": [r.scene.shape if r.scene else None for r in rows],
        "caption_colour": [r.caption_pair[0] if r.caption_pair else None for r in rows],
        "caption_shape": [r.caption_pair[1] if r.caption_pair else None for r in rows],
        "group": _groups(rows),
        "expected_ingest_reason": [reason_value(expected_ingest_reason(r)) for r in rows],
        "expected_filter_reason": [reason_value(x) for x in _expected_filter_reasons(rows, facts)],
        "width": [f.width if f else None for f in served],
        "height": [f.height if f else None for f in served],
        "sha256": [f.sha256 if f else None for f in served],
    }
    return pa.table(columns, schema=GROUND_TRUTH_SCHEMA)


def _site_routes(rows: list[PlannedRow], facts: dict[str, FileFacts]) -> dict[str, dict]:
    routes: dict[str, dict] = {}
    for row in rows:
        for path, route in row.routes.items():
            if route["truncate_to"] == "half":
                route = {**route, "truncate_to": facts[route["file"]].size // 2}
            routes[path] = route
    return dict(sorted(routes.items()))


# -- writing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSummary:
    out_dir: Path
    rows: int
    seed: int
    slow_delay: float
    base_url: str
    kind_counts: dict[str, int]
    rendered: bool  # False when an existing site was reused and only the URL list rewritten
    seconds: float


def _join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _check_base_url(base_url: str) -> None:
    parts = urllib.parse.urlsplit(base_url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path.strip("/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"--base-url {base_url!r}: expected something like http://127.0.0.1:8000")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def _routes_bytes(routes: dict[str, dict]) -> bytes:
    """One route per line: greppable, diffable, still one JSON object."""
    lines = [f"{json.dumps(path)}: {json.dumps(route)}" for path, route in routes.items()]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def _stamp(rows: int, seed: int, slow_delay: float) -> dict:
    return {"format": CORPUS_FORMAT, "rows": rows, "seed": seed, "slow_delay": float(slow_delay)}


def _read_stamp(site_dir: Path) -> dict | None:
    try:
        return json.loads((site_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_url_list(out_dir: str | os.PathLike, base_url: str) -> None:
    """Point the URL list (and the ground truth's url column) at ``base_url``; cheap."""
    _check_base_url(base_url)
    out = Path(out_dir)
    truth = load_ground_truth(out)
    urls = pa.array([_join_url(base_url, p) for p in truth.column("path").to_pylist()], pa.string())
    truth = truth.set_column(truth.schema.get_field_index("url"), "url", urls)
    _write_parquet(out / "ground_truth.parquet", truth)
    url_list = pa.table({"url": urls, "caption": truth.column("caption")}, schema=URL_LIST_SCHEMA)
    _write_parquet(out / "urls.parquet", url_list)


def load_ground_truth(out_dir: str | os.PathLike) -> pa.Table:
    path = Path(out_dir) / "ground_truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the corpus first (python -m infra.local.corpus)")
    return pq.read_table(path)


def _summary_json(rows: list[PlannedRow], truth: pa.Table, seed: int, slow_delay: float) -> dict:
    kind_counts = Counter(r.kind for r in rows)
    ingest = Counter(x for x in truth.column("expected_ingest_reason").to_pylist() if x)
    filtered = Counter(x for x in truth.column("expected_filter_reason").to_pylist() if x)
    return {
        "format": CORPUS_FORMAT,
        "rows": len(rows),
        "seed": seed,
        "slow_delay_s": float(slow_delay),
        "kind_counts": {kind: kind_counts.get(kind, 0) for kind in KINDS},
        "kind_rates": {"clean": "the rest", **KIND_RATES},
        "expected_ingest_reasons": dict(sorted(ingest.items())),
        "expected_rejected_before_download": sum(n for r, n in ingest.items() if Reason(r).stage is Stage.FILTER),
        "expected_filter_reasons": dict(sorted(filtered.items())),
        "expected_kept_by_filter": len(rows) - sum(filtered.values()),
        "filter_defaults": {
            "min_side": FILTER_MIN_SIDE,
            "max_aspect_ratio": FILTER_MAX_ASPECT,
            "min_caption_chars": FILTER_MIN_CAPTION_CHARS,
            "min_caption_words": FILTER_MIN_CAPTION_WORDS,
        },
        "held_out_pairs": sorted([c, s] for c, s in scenes.HELD_OUT_PAIRS),
        "held_out_statement": "No held-out pair appears anywhere in this corpus: not in any image, "
        "not in any caption (mismatched captions included). Checked at generation.",
    }


def _replace_site(out: Path, staging: Path) -> None:
    site = out / "site"
    if site.exists():
        if any(site.iterdir()) and not ((site / "routes.json").exists() or (site / STAMP_NAME).exists()):
            raise FileExistsError(f"{site} exists and is not a corpus site made by this tool; not replacing it")
        shutil.rmtree(site)
    os.replace(staging, site)


def generate(
    out_dir: str | os.PathLike,
    base_url: str,
    rows: int,
    seed: int = 0,
    workers: int | None = None,
    slow_delay: float = DEFAULT_SLOW_DELAY_S,
    *,
    progress: bool = True,
) -> CorpusSummary:
    """Make (or reuse) the corpus in ``out_dir`` and point its URL list at ``base_url``."""
    if rows < 1:
        raise ValueError(f"rows={rows}: must be at least 1")
    if slow_delay <= 0:
        raise ValueError(f"slow_delay={slow_delay}: must be positive")
    _check_base_url(base_url)
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    site = out / "site"

    summary_path = out / "corpus.json"
    if _read_stamp(site) == _stamp(rows, seed, slow_delay) and summary_path.is_file():
        try:
            write_url_list(out, base_url)
        except (OSError, pa.ArrowException):
            pass  # fall through and make it again
        else:
            counts = json.loads(summary_path.read_text())["kind_counts"]
            seconds = time.monotonic() - started
            return CorpusSummary(out, rows, seed, slow_delay, base_url, counts, False, seconds)

    planned = plan_corpus(rows, seed, slow_delay)
    _check_no_held_out(planned)
    jobs = {job.file: job for row in planned for job in row.jobs}
    if any(row.kind == "placeholder" for row in planned):
        jobs[PLACEHOLDER_FILE] = FileJob(PLACEHOLDER_FILE, "placeholder")

    (site / STAMP_NAME).unlink(missing_ok=True)  # whatever happens next, the old site is stale
    staging = out / ".site.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    ordered_jobs = sorted(jobs.values(), key=lambda job: job.file)
    facts = _make_files(staging, ordered_jobs, workers or os.cpu_count() or 1, progress)
    _check_duplicates(planned, facts)
    routes = _site_routes(planned, facts)
    clean_images = [(row.path, row.caption) for row in planned if row.kind == "clean"]
    routes.update(pages.write_pages(staging, out, clean_images, seed))  # the crawler's pages, /web/ and /robots.txt
    _write_atomically(staging / "routes.json", _routes_bytes(dict(sorted(routes.items()))))

    truth = _ground_truth_table(planned, facts, base_url)
    _write_parquet(out / "ground_truth.parquet", truth)
    _write_parquet(out / "urls.parquet", truth.select(["url", "caption"]).cast(URL_LIST_SCHEMA))
    summary = _summary_json(planned, truth, seed, slow_delay)
    _write_atomically(summary_path, _json_bytes(summary))
    _write_atomically(staging / STAMP_NAME, _json_bytes(_stamp(rows, seed, slow_delay)))
    _replace_site(out, staging)
    return CorpusSummary(
        out, rows, seed, slow_delay, base_url, summary["kind_counts"], True, time.monotonic() - started
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.corpus",
        description="Generate the demo corpus: a deterministic synthetic web of scene images with "
        "planted defects (duplicates, bad captions, HTTP errors, slow and truncated responses, "
        "opt-outs, redirects), its URL list and its ground truth. Serve it with "
        "`python -m infra.local.webserver --root OUT/site`.",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (site/, urls.parquet, ground_truth.parquet, corpus.json)"
    )
    parser.add_argument("--base-url", required=True, help="where the server will be: http://127.0.0.1:PORT")
    parser.add_argument("--rows", type=int, required=True, help="number of URL-list rows")
    parser.add_argument("--seed", type=int, default=0, help="same rows and seed, same bytes (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="render processes (default: CPU count); the output is the same"
    )
    parser.add_argument(
        "--slow-delay",
        type=float,
        default=DEFAULT_SLOW_DELAY_S,
        help="seconds a 'slow' response trickles its body before finishing; the downloader's timeout "
        "must be below it for the expected 'timeout' (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        summary = generate(args.out, args.base_url, args.rows, args.seed, args.workers, args.slow_delay,
                           progress=not args.no_progress)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    action = "generated" if summary.rendered else "reused site, rewrote URL list of"
    print(f"{action} {summary.rows} rows in {summary.out_dir} ({summary.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
