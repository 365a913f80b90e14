"""Data for the index and search tests: a pool with decisions, and embeddings folders of it.

``write_embeddings`` writes the embeddings folder of the issue-18 contract
(clip-retrieval's layout + ``embeddings.json`` last) with real embeddings of a seeded,
untrained webclip-tiny checkpoint (``apply.model``), so the index and search stages are
tested on what ``python -m apply.embed`` writes. ``write_vectors`` writes the same layout
around vectors a test constructs (for recall at a size where approximate search is chosen).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from _train_fixtures import train_sample
from apply import model as apply_model
from core.layout import sample_key, shard_id_of
from core.shard_writer import ShardWriter
from filter.run import DECISION_SCHEMA
from train import checkpoint as ckpt
from train import data as data_mod
from train import model as model_mod

HOSTILE_CAPTION = '<script>alert(1)</script> "quoted" & <img src=x onerror=alert(2)>'
ROWS = 12  # pool rows per shard
SHARDS = 3


def write_checkpoint(folder: str) -> str:
    """A seeded, untrained webclip-tiny in the trainer's layout; returns the checkpoint folder.

    Its matrices are drawn wider than open_clip's init (std 2/sqrt(fan-in)): at that init an
    untrained image tower maps every image to nearly one point (cosines > 0.9999, below
    float16's resolution), and searching needs images that can be told apart.
    """
    torch.manual_seed(0)
    module = model_mod.create_model("webclip-tiny")
    with torch.no_grad():
        for weight in module.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, 2.0 / weight.shape[-1] ** 0.5)
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(3, 0, 0), "webclip-tiny",
                         model_mod.image_size_of(module), {})  # fmt: skip
    return folder


def write_pool(folder: str) -> list[dict]:
    """SHARDS pool shards of ROWS samples (one failed download each); row 0 of shard 1 has a hostile caption.

    Returns the success rows (key, url, caption, shard id).
    """
    rows = []
    for shard in range(SHARDS):
        writer = ShardWriter(folder, shard, "jpg", [])
        for row in range(ROWS):
            jpeg, caption, _ = train_sample(seed=5, index=shard * ROWS + row, noise=0.0)
            key = sample_key(shard, row, ROWS)
            if (shard, row) == (1, 0):
                caption = HOSTILE_CAPTION
            record = {"key": key, "url": f"https://example.com/{shard}/{row}.jpg", "caption": caption,
                      "status": "success", "width": 128, "height": 128}  # fmt: skip
            if row == ROWS - 1:
                writer.add({**record, "status": "failed_to_download", "reason": "http_404"}, None)
                continue
            writer.add(record, jpeg)
            rows.append({**record, "shard": shard})
        writer.commit({"count": ROWS, "successes": ROWS - 1})
    return rows


def decisions() -> dict[str, tuple[bool, str | None, str | None]]:
    """key -> (keep, reason, dup_of) for ``write_pool``'s pool: rows 3 and 7 of each shard rejected as
    caption_short, row 5 as dup_near of row 4, row 9 of shard 2 as dup_exact of shard 0's row 2."""
    decided = {}
    for shard in range(SHARDS):
        for row in range(ROWS):
            verdict: tuple[bool, str | None, str | None] = (True, None, None)
            if row == ROWS - 1:
                verdict = (False, "http_404", None)
            elif row in (3, 7):
                verdict = (False, "caption_short", None)
            elif row == 5:
                verdict = (False, "dup_near", sample_key(shard, 4, ROWS))
            elif (shard, row) == (2, 9):
                verdict = (False, "dup_exact", sample_key(0, 2, ROWS))
            decided[sample_key(shard, row, ROWS)] = verdict
    return decided


def write_decisions(folder: str) -> None:
    """The filter's decision files ({shard}.parquet, DECISION_SCHEMA) of ``decisions()``."""
    os.makedirs(folder, exist_ok=True)
    decided = decisions()
    for shard in range(SHARDS):
        keys = [sample_key(shard, row, ROWS) for row in range(ROWS)]
        verdicts = [decided[k] for k in keys]
        columns = [pa.array(keys), pa.array([v[0] for v in verdicts]), pa.array([v[1] for v in verdicts], pa.string()),
                   pa.array([v[2] for v in verdicts], pa.string())]
        columns += [pa.nulls(len(keys), f.type) for f in list(DECISION_SCHEMA)[4:]]
        pq.write_table(pa.Table.from_arrays(columns, schema=DECISION_SCHEMA), os.path.join(folder, f"{shard:05d}.parquet"))
    with open(os.path.join(folder, "_filter_stats.json"), "w") as handle:
        json.dump({"rows": len(decided)}, handle)


def _write_shard(out: str, n: int, image: np.ndarray, text: np.ndarray, meta: dict[str, list]) -> None:
    for sub in ("img_emb", "text_emb", "metadata", "done"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    np.save(os.path.join(out, "img_emb", f"img_emb_{n}.npy"), image.astype(np.float16))
    np.save(os.path.join(out, "text_emb", f"text_emb_{n}.npy"), text.astype(np.float16))
    pq.write_table(pa.table(meta), os.path.join(out, "metadata", f"metadata_{n}.parquet"))


def _commit(out: str, info: dict, shards: dict[int, tuple[str, int]], source: str) -> None:
    for n, (tar, rows) in shards.items():
        with open(os.path.join(out, "done", f"{n}.json"), "w") as handle:
            json.dump({"rows": rows, "tar": tar, "checkpoint": info.get("checkpoint")}, handle)
    info = {**info, "shards": {str(n): {"tar": t, "rows": r} for n, (t, r) in shards.items()},
            "rows": sum(r for _, r in shards.values()), "source": source}  # fmt: skip
    with open(os.path.join(out, "embeddings.json"), "w") as handle:
        json.dump(info, handle, indent=2)


def write_embeddings(model: apply_model.Model, tars: list[str], out: str, source: str,
                     image_is_caption: bool = False) -> Counter:
    """The embeddings folder of ``tars`` (the contract's layout); returns the skipped samples by reason.

    ``image_is_caption``: store each sample's caption embedding as its image embedding too, so
    a caption's own sample is by construction its best match.
    """
    shards, skipped = {}, Counter()
    for tar in tars:
        n = shard_id_of(tar)
        keys, captions, urls, images, sizes = [], [], [], [], []
        for sample in data_mod.iter_tar_samples(tar, skipped):
            try:
                caption = data_mod.decode_caption(sample.members)
                image = model.decode(data_mod.image_bytes(sample.members))
            except data_mod.SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            meta = json.loads(sample.members.get("json", b"{}"))
            keys.append(sample.key)
            captions.append(caption)
            urls.append(meta.get("url"))
            sizes.append((meta.get("width"), meta.get("height")))
            images.append(image)
        text = model.encode_texts(captions).numpy()
        image = text if image_is_caption else model.encode_images(torch.stack(images)).numpy()
        _write_shard(out, n, image, text, {
            "key": keys, "url": urls, "caption": captions, "shard": [tar] * len(keys),
            "image_width": [w for w, _ in sizes], "image_height": [h for _, h in sizes]})  # fmt: skip
        shards[n] = (tar, len(keys))
    info = {"checkpoint": model.path, "model": model.name, "step": model.step, "dim": model.embed_dim,
            "image_size": model.image_size}  # fmt: skip
    _commit(out, info, shards, source)
    return skipped


def clustered(rows: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, their cluster ids): points around random unit centres, like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = rng.integers(0, clusters, rows)
    points = centres[ids] + spread * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
    return points / np.linalg.norm(points, axis=1, keepdims=True), ids


def write_vectors(out: str, image: np.ndarray, text: np.ndarray, per_shard: int) -> None:
    """An embeddings folder around constructed vectors (keys ``v{row}``, no real tars)."""
    shards = {}
    for n, start in enumerate(range(0, len(image), per_shard)):
        stop = min(start + per_shard, len(image))
        tar = f"/nonexistent/{n:05d}.tar"
        keys = [f"v{i}" for i in range(start, stop)]
        _write_shard(out, n, image[start:stop], text[start:stop], {
            "key": keys, "url": [None] * len(keys), "caption": [f"vector {i}" for i in range(start, stop)],
            "shard": [tar] * len(keys)})  # fmt: skip
        shards[n] = (tar, stop - start)
    _commit(out, {"checkpoint": None, "model": None, "step": None, "dim": image.shape[1], "image_size": None},
            shards, "constructed")


def build_all(root: str) -> dict[str, str]:
    """Checkpoint, pool, decisions, the pool's embeddings and their index under ``root``; their paths."""
    from apply.index import IndexConfig, run_index

    paths = {name: os.path.join(root, name) for name in ("pool", "decisions", "embeddings", "index")}
    paths["checkpoint"] = write_checkpoint(os.path.join(root, "run", "checkpoints"))
    write_pool(paths["pool"])
    write_decisions(paths["decisions"])
    model = apply_model.load(paths["checkpoint"])
    tars = [os.path.join(paths["pool"], f"{shard:05d}.tar") for shard in range(SHARDS)]
    write_embeddings(model, tars, paths["embeddings"], paths["pool"])
    run_index(IndexConfig(embeddings=paths["embeddings"], output_folder=paths["index"], progress=False))
    return paths
