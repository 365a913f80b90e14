"""The benchmark's real-photo web (bench/photo_corpus.py): what it promises about its images."""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pyarrow.parquet as pq
from PIL import Image, JpegImagePlugin

from bench.photo_corpus import MAX_LONG_SIDE, MAX_LOSSLESS_SIDE, MIN_LONG_SIDE, SOURCES, generate_photos
from infra.local.webserver import serve
from ingest.resizer import phash


def test_photo_corpus_is_web_like_distinct_deterministic_and_served(tmp_path):
    table = generate_photos(tmp_path / "a", count=80, seed=0, workers=2, progress=False)
    rows = table.to_pylist()
    assert len(rows) == 80
    assert {r["format"] for r in rows} == {"jpg", "png", "webp"}
    assert len({r["source"] for r in rows}) >= len(SOURCES) // 2
    site = tmp_path / "a" / "site"
    routes = json.loads((site / "routes.json").read_text())
    assert set(routes) == {r["path"] for r in rows}
    hashes = set()
    for row in rows:
        data = (site / row["path"][1:]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        with Image.open(site / row["path"][1:]) as image:
            assert image.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[row["format"]]
            assert routes[row["path"]]["content_type"] == Image.MIME[image.format]
            assert image.size == (row["width"], row["height"])
            top = MAX_LONG_SIDE if row["format"] == "jpg" else MAX_LOSSLESS_SIDE
            assert MIN_LONG_SIDE - 1 <= max(image.size) <= top
            if row["format"] == "jpg":
                assert 80 <= row["quality"] <= 95
                assert bool(image.info.get("progressive")) == row["progressive"]
                if image.mode == "RGB":
                    sampling = JpegImagePlugin.get_sampling(image)
                    assert {0: "4:4:4", 2: "4:2:0"}[sampling] == row["subsampling"]
            hashes.add(phash(image.convert("RGB")))
    assert len({r["sha256"] for r in rows}) == 80  # distinct bytes
    assert len(hashes) >= 76  # and, nearly all, distinct pictures
    jpgs = [r for r in rows if r["format"] == "jpg"]
    assert any(r["progressive"] for r in jpgs) and not all(r["progressive"] for r in jpgs)
    assert {r["subsampling"] for r in jpgs} == {"4:2:0", "4:4:4"}

    # the same images whatever the worker count; a rerun reuses what is on disk
    again = generate_photos(tmp_path / "b", count=12, seed=0, workers=1, progress=False)
    assert again.column("sha256").to_pylist() == table.column("sha256").to_pylist()[:12]
    stamp = (site / "stamp.json").stat().st_mtime_ns
    assert generate_photos(tmp_path / "a", count=80, seed=0, progress=False).equals(
        pq.read_table(tmp_path / "a" / "photos.parquet"))
    assert (site / "stamp.json").stat().st_mtime_ns == stamp

    with serve(site) as base_url:
        row = rows[0]
        with urllib.request.urlopen(base_url + row["path"]) as response:
            assert response.headers["Content-Type"] == routes[row["path"]]["content_type"]
            assert hashlib.sha256(response.read()).hexdigest() == row["sha256"]
