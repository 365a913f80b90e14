"""The filter on an embeddings folder: CLIP scores are its cosines, and semantic near duplicates.

A real pool (the shard writer's layout, tars and parquet with the hashes ingest records)
with planted copies: a scene re-encoded and shifted by two pixels, once in the same shard
and once in a later one, and one copy that comes *before* its original in key order. The
embed stage embeds it; the filter decides from the folder.

The model is an untrained open_clip ViT of one 64-pixel patch (seeded): its image
embedding is close to a random projection of the pixels, so a shifted re-encode stays
close to its original (cosine above 0.97 here) while distinct scenes do not (below 0.9).
Untrained CLIP towers of the usual shapes map every image to nearly one direction, and a
trained one is too costly to make in a test.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from _train_fixtures import train_sample
from apply import embeddings as emb
from apply.embed import EmbedConfig, run_embed
from core.config import ConfigError
from core.layout import sample_key
from core.shard_writer import ShardWriter
from filter.config import FilterConfig
from filter.run import run_filter
from train import checkpoint as ckpt
from train import model as model_mod

ROWS = 6
MODEL = "webclip-test-onepatch"
ONE_PATCH = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 256, "head_width": 64, "patch_size": 64, "pool_type": "avg"},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}
# (shard, row) of a copy -> (shard, row) of its original; scenes are seeded by their original's position
COPIES = {(0, 4): (0, 1), (1, 2): (0, 3), (0, 0): (1, 5)}
THRESHOLD = 0.95


def key(shard: int, row: int) -> str:
    return sample_key(shard, row, ROWS)


def shifted_reencode(jpeg: bytes, shift: int = 2, quality: int = 85) -> bytes:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    width, height = image.size
    image = image.crop((shift, shift, width, height)).resize((width, height))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def embedded_pool(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("semantic")
    pool = str(root / "pool")
    for shard in range(2):
        writer = ShardWriter(pool, shard, "jpg", [])
        for row in range(ROWS):
            seed_shard, seed_row = COPIES.get((shard, row), (shard, row))
            jpeg, caption, _ = train_sample(seed=9, index=seed_shard * ROWS + seed_row, noise=0.0)
            if (shard, row) in COPIES:
                jpeg = shifted_reencode(jpeg)
            digest = hashlib.sha256(jpeg).hexdigest()
            writer.add({"key": key(shard, row), "url": f"http://127.0.0.1/{shard}/{row}.jpg", "caption": caption,
                        "status": "success", "width": 128, "height": 128, "original_width": 640,
                        "original_height": 480, "sha256": digest, "phash": digest[:16], "luma_std": 30.0}, jpeg)
        writer.commit({"count": ROWS})
    config_file = str(root / f"{MODEL}.json")
    with open(config_file, "w") as handle:
        json.dump(ONE_PATCH, handle)
    model_mod.register_model_config(config_file)
    torch.manual_seed(0)
    model = model_mod.create_model(MODEL)
    checkpoints = str(root / "run" / "checkpoints")
    ckpt.save_checkpoint(checkpoints, model, ckpt.TrainProgress(1, 0, 0), MODEL, 64, {})
    embeddings = str(root / "embeddings")
    run_embed(EmbedConfig(checkpoint=checkpoints, model_config=config_file, shards=pool, output_folder=embeddings,
                          distributor="inline", progress=False))  # fmt: skip
    return pool, embeddings


def decide(pool: str, output, **options) -> dict[str, dict]:
    run_filter(FilterConfig(pool=pool, output_folder=str(output), progress=False, **options))
    out = {}
    for path in sorted(output.glob("0*.parquet")):
        out.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    return out


def direct_cosines(embeddings: str) -> tuple[list[str], np.ndarray]:
    keys, rows = [], []
    for n in (0, 1):
        keys += emb.read_metadata(embeddings, n)["key"].to_pylist()
        rows.append(emb.read_array(emb.image_path(embeddings, n)).astype(np.float64))
    vectors = np.concatenate(rows)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return keys, vectors @ vectors.T


def test_planted_copies_are_rejected_as_semantic_duplicates_of_the_first(embedded_pool, tmp_path):
    pool, embeddings = embedded_pool
    keys, cosines = direct_cosines(embeddings)
    planted = {tuple(sorted((key(*c), key(*o)))) for c, o in COPIES.items()}
    for i, a in enumerate(keys):  # the model does what the docstring says, so the test can mean something
        for j, b in enumerate(keys[i + 1:], i + 1):
            assert (cosines[i, j] >= THRESHOLD) == ((a, b) in planted), (a, b, cosines[i, j])
    got = decide(pool, tmp_path / "dec", distributor="inline", embeddings=embeddings, dedupe_near=False,
                 semantic_dedupe_threshold=THRESHOLD)  # fmt: skip
    expected = {later: earlier for earlier, later in planted}  # the later one in key order goes
    for k, decision in got.items():
        if k in expected:
            assert (decision["keep"], decision["reason"], decision["dup_of"]) == (False, "dup_semantic", expected[k])
        else:
            assert (decision["keep"], decision["reason"], decision["dup_of"]) == (True, None, None), k
    stats = json.loads((tmp_path / "dec" / "_filter_stats.json").read_text())
    assert stats["reasons"] == {"dup_semantic": 3} and stats["semantic_dup"]["pairs"] == 3

    again = decide(pool, tmp_path / "processes", distributor="processes", workers=2, embeddings=embeddings,
                   dedupe_near=False, semantic_dedupe_threshold=THRESHOLD)  # fmt: skip
    assert again == got  # the same decisions whatever the workers
    off = decide(pool, tmp_path / "off", distributor="inline", embeddings=embeddings, dedupe_near=False)
    assert all(d["keep"] for d in off.values())  # off unless a threshold is given


def test_the_clip_score_is_the_cosine_of_the_stored_embeddings(embedded_pool, tmp_path):
    pool, embeddings = embedded_pool
    direct = {}
    for n in (0, 1):
        keys = emb.read_metadata(embeddings, n)["key"].to_pylist()
        images = emb.read_array(emb.image_path(embeddings, n)).astype(np.float64)
        texts = emb.read_array(emb.text_path(embeddings, n)).astype(np.float64)
        cos = (images * texts).sum(1) / np.linalg.norm(images, axis=1) / np.linalg.norm(texts, axis=1)
        direct.update(zip(keys, cos.tolist()))
    threshold = float(np.median(list(direct.values())))
    got = decide(pool, tmp_path / "clip", distributor="inline", embeddings=embeddings, dedupe_near=False,
                 clip_threshold=threshold)  # fmt: skip
    assert got.keys() == direct.keys()
    for k, decision in got.items():
        assert decision["clip_score"] == pytest.approx(direct[k], abs=1e-6)
        assert (decision["reason"] == "low_clip_score") == (np.float32(direct[k]) < threshold), k
    assert 0 < sum(d["reason"] == "low_clip_score" for d in got.values()) < len(got)


def test_options_that_need_the_embeddings_say_so(tmp_path):
    with pytest.raises(ConfigError, match="semantic_dedupe_threshold needs embeddings"):
        FilterConfig(pool="p", output_folder="o", semantic_dedupe_threshold=0.9)
    with pytest.raises(ConfigError, match="clip_threshold / clip_top_fraction need embeddings"):
        FilterConfig(pool="p", output_folder="o", clip_threshold=0.2)
    with pytest.raises(ConfigError, match="a cosine"):
        FilterConfig(pool="p", output_folder="o", embeddings="e", semantic_dedupe_threshold=2.0)


def test_an_unfinished_embeddings_folder_is_named(embedded_pool, tmp_path):
    import subprocess
    import sys

    pool, _ = embedded_pool
    result = subprocess.run([sys.executable, "-m", "filter", "--pool", pool, "--output_folder", str(tmp_path / "d"),
                             "--embeddings", str(tmp_path), "--semantic_dedupe_threshold", "0.9", "--distributor",
                             "inline"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "no embeddings.json" in result.stderr and str(tmp_path) in result.stderr
