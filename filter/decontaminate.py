"""The evaluation set's pHashes, so the pool's near duplicates of it can be dropped.

A model evaluated on images it trained on reports a score it did not earn; the
filter therefore rejects pool images within ``decontaminate_threshold`` bits of any
evaluation image (reason ``eval_contaminated``). The evaluation set may be a tar of
images (webdataset style, like ``infra.local.evalset`` writes), a folder of image
files, or a parquet with a ``phash`` column (16 hex digits, as ingest writes).

Hashes are taken the way ingest takes them: of the picture's content, so a uniform
border that a ``border`` resize added around an evaluation image is trimmed first.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageChops

from core import storage
from core.layout import IMAGE_EXTENSIONS
from core.tarreader import iter_tar_files
from ingest.resizer import phash


def content_phash(data: bytes) -> int:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    corner = image.getpixel((0, 0))
    box = ImageChops.difference(image, Image.new("RGB", image.size, corner)).convert("L").point(
        lambda v: 255 if v > 8 else 0).getbbox()
    if box and box != (0, 0) + image.size:
        image = image.crop(box)
    return int(phash(image), 16)


def load_eval_hashes(source: str) -> np.ndarray:
    """uint64 pHashes of every image in ``source``; a clear error if there are none."""
    hashes: list[int] = []
    if source.endswith(".parquet"):
        with storage.open_file(source) as handle:
            values = pq.read_table(handle, columns=["phash"]).column("phash").to_pylist()
        hashes = [int(v, 16) for v in values if v]
    elif source.endswith(".tar"):
        with storage.open_file(source) as handle:
            for name, data in iter_tar_files(handle):
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    hashes.append(content_phash(data))
    else:
        fs, root = storage.filesystem(source)
        for path in sorted(fs.find(root)):
            if path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                with fs.open(path, "rb") as handle:
                    hashes.append(content_phash(handle.read()))
    if not hashes:
        raise SystemExit(f"filter: decontaminate={source!r} holds no images (or no phash values)")
    return np.array(hashes, dtype=np.uint64)
