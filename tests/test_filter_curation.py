"""Curation: the filter's global passes on pools whose every defect the test planted.

The filter reads metadata only, so these pools are parquet files written here, row
by row, with the hashes and sizes a real ingest would record; the near-duplicate
check against rendered images and the corpus's ground truth is in
tests/test_pipeline_integration.py, and the full demo figures in BENCHMARKS.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.layout import POOL_SCHEMA, sample_key
from filter.config import FilterConfig
from core.groups import first_of_groups
from filter.dedupe import (
    band_keys,
    candidate_edges,
    components_first,
    plan_bands,
    unique_edges,
)
from filter.facts import PoolReadError
from filter.run import run_filter
from ingest.resizer import perceptual_signature

ROWS = 200


def _row(shard: int, index: int, **values) -> dict:
    row = {name: None for name in POOL_SCHEMA.names}
    sha = hashlib.sha256(f"{shard}/{index}".encode()).hexdigest()
    row.update(key=sample_key(shard, index, ROWS), url=f"http://img.example/{shard}/{index}.jpg",
               caption=f"a photo of thing number {shard} {index}", status="success", width=128, height=96,
               original_width=640, original_height=480, sha256=sha, luma_std=30.0,
               phash=f"{int.from_bytes(hashlib.blake2b(sha.encode(), digest_size=8).digest(), 'big'):016x}")
    row.update(values)
    return row


def write_pool(folder, shards: list[list[dict]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for shard_id, rows in enumerate(shards):
        table = pa.Table.from_pylist(rows, schema=POOL_SCHEMA)
        pq.write_table(table, folder / f"{shard_id:05d}.parquet")
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    return str(folder)


def decisions(folder) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("0*.parquet")):
        out.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    return out


def flip(hex_hash: str, bits: list[int]) -> str:
    value = int(hex_hash, 16)
    for b in bits:
        value ^= 1 << b
    return f"{value:016x}"


# -- kernels ---------------------------------------------------------------------------------


def test_lsh_finds_the_close_pairs_brute_force_finds_and_nothing_else():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    for i in range(400):  # plant pairs at 0..10 bits
        source = int(rng.integers(0, 2000))
        bits = rng.choice(64, int(rng.integers(0, 11)), replace=False)
        hashes[2000 + i % 1000] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in bits))
    ids = np.arange(len(hashes), dtype=np.int64) * 3 + 5
    plan = plan_bands(len(hashes), threshold=10, recall=0.99)
    keys = band_keys(hashes, plan.positions())
    left, right = unique_edges(*candidate_edges(keys.reshape(-1), np.repeat(ids, plan.bands),
                                                np.repeat(hashes, plan.bands), 10))
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    a, b = np.nonzero(np.triu(distance <= 10, k=1))
    truth = set(zip(ids[a].tolist(), ids[b].tolist()))
    found = set(zip(left.tolist(), right.tolist()))
    assert found <= truth  # every edge verified
    assert len(found) >= 0.97 * len(truth) and len(truth) > 300


def test_plan_bands_meets_the_recall_it_promises():
    plan = plan_bands(1_000_000, threshold=8, recall=0.95)
    assert plan.recall_at(8) >= 0.95 and plan.recall_at(0) == 1.0
    assert plan.recall_at(8) > plan.recall_at(16)
    assert plan_bands(5_000_000, 10, 0.99).bits > plan_bands(10_000, 10, 0.99).bits  # wider bands when bigger


def test_first_of_groups_and_components_keep_the_smallest_row():
    rejected, keeper = first_of_groups(np.array([7, 3, 7, 7, 3], np.uint64), np.array([40, 11, 12, 30, 10]))
    assert dict(zip(rejected.tolist(), keeper.tolist())) == {11: 10, 30: 12, 40: 12}
    rejected, keeper = components_first(np.array([5, 9, 2]), np.array([9, 20, 3]))  # 5-9-20 chain, 2-3
    assert dict(zip(rejected.tolist(), keeper.tolist())) == {9: 5, 20: 5, 3: 2}


# -- the rules, on a planted pool ------------------------------------------------------------


@pytest.fixture
def planted_pool(tmp_path):
    """Two shards; each planted row's expected reason in ``expect`` (key -> reason or None)."""
    shard0 = [_row(0, i) for i in range(ROWS)]
    shard1 = [_row(1, i) for i in range(ROWS)]
    expect = {r["key"]: None for r in shard0 + shard1}

    def plant(shard_rows, shard, index, expected, **values):
        shard_rows[index] = _row(shard, index, **values)
        expect[shard_rows[index]["key"]] = expected

    base = shard0[1]
    plant(shard0, 0, 2, "http_404", status="failed_to_download", reason="http_404", sha256=None, phash=None)
    plant(shard0, 0, 3, "caption_missing", caption=None)
    plant(shard0, 0, 4, "caption_boilerplate", caption="IMG_1234.JPG")
    plant(shard0, 0, 5, "caption_short", caption="red")
    plant(shard0, 0, 6, "language", caption="Une photographie d'un grand chat noir assis sur la table de la cuisine")
    plant(shard0, 0, 7, "too_small", original_width=40, original_height=40)
    plant(shard0, 0, 8, "aspect_ratio", original_width=1000, original_height=100)
    plant(shard0, 0, 9, "near_blank", luma_std=0.5)
    plant(shard0, 0, 10, "hash_missing", phash=None)
    plant(shard0, 0, 11, "hash_missing", sha256="not-hex")
    # The same URL (spelled differently) later: dup_url, even with other bytes.
    plant(shard1, 1, 0, "dup_url", url=base["url"].replace("http://img.example", "HTTP://IMG.example:80") + "#x")
    # The same bytes under another URL: dup_exact; near bytes: dup_near.
    plant(shard1, 1, 1, "dup_exact", sha256=base["sha256"], phash=base["phash"])
    plant(shard1, 1, 2, "dup_near", phash=flip(base["phash"], [0, 9, 33, 60]))
    # A near copy that changed shape is another picture (the guard), not a duplicate.
    plant(shard1, 1, 3, None, phash=flip(base["phash"], [1, 2]), original_width=480, original_height=640)
    # The first copy of some bytes fails its caption: the next acceptable copy is kept.
    plant(shard0, 0, 20, "caption_short", caption="x", sha256="ab" * 32, phash="0f0f0f0f0f0f0f0f")
    plant(shard1, 1, 20, None, sha256="ab" * 32, phash="0f0f0f0f0f0f0f0f")
    plant(shard1, 1, 21, "dup_exact", sha256="ab" * 32, phash="0f0f0f0f0f0f0f0f")
    pool = write_pool(tmp_path / "pool", [shard0, shard1])
    return pool, expect


def test_every_row_gets_its_planted_reason_and_dups_name_their_keeper(planted_pool, tmp_path):
    pool, expect = planted_pool
    summary = run_filter(FilterConfig(pool=pool, output_folder=str(tmp_path / "dec"), distributor="inline",
                                      languages=["en"], progress=False))
    got = decisions(tmp_path / "dec")
    assert len(got) == len(expect) == summary.rows
    wrong = {k: (expect[k], d["reason"]) for k, d in got.items() if d["reason"] != expect[k]}
    assert not wrong
    assert all(d["keep"] == (d["reason"] is None) for d in got.values())
    base_key = sample_key(0, 1, ROWS)
    for index in (0, 1, 2):
        assert got[sample_key(1, index, ROWS)]["dup_of"] == base_key
    assert got[sample_key(1, 21, ROWS)]["dup_of"] == sample_key(1, 20, ROWS)
    assert got[base_key]["language"] == "en"
    stats = json.loads((tmp_path / "dec" / "_filter_stats.json").read_text())
    assert stats["rows"] == len(expect) and sum(stats["reasons"].values()) == stats["rejected"]
    assert not (tmp_path / "dec" / "_work").exists()


def test_decisions_do_not_depend_on_workers_or_partitions(planted_pool, tmp_path):
    pool, _ = planted_pool
    common = dict(pool=pool, languages=["en"], progress=False)
    run_filter(FilterConfig(output_folder=str(tmp_path / "inline"), distributor="inline", **common))
    run_filter(FilterConfig(output_folder=str(tmp_path / "ray"), distributor="ray", workers=2,
                            partition_rows=1000, **common))  # several partitions per pass
    run_filter(FilterConfig(output_folder=str(tmp_path / "processes"), distributor="processes", workers=2,
                            partition_rows=1000, **common))  # the default on one machine (auto)
    a, b = decisions(tmp_path / "inline"), decisions(tmp_path / "ray")
    assert a == b
    assert decisions(tmp_path / "processes") == a
    stats = json.loads((tmp_path / "ray" / "_filter_stats.json").read_text())
    assert stats["near_dup_plan"]["tasks"] > 1


def test_a_corrupt_pool_parquet_is_named_not_skipped(planted_pool, tmp_path):
    pool, _ = planted_pool
    with open(f"{pool}/00001.parquet", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(PoolReadError, match="00001.parquet"):
        run_filter(FilterConfig(pool=pool, output_folder=str(tmp_path / "dec"), distributor="inline", progress=False))
    result = subprocess.run([sys.executable, "-m", "filter", "--pool", pool, "--output_folder", str(tmp_path / "d2"),
                             "--distributor", "inline", "--progress", "false"], capture_output=True, text=True)
    assert result.returncode != 0 and "00001.parquet" in result.stderr


def test_clip_rule_threshold_top_fraction_and_missing_scores(planted_pool, tmp_path):
    pool, expect = planted_pool
    scores = tmp_path / "scores"
    scores.mkdir()
    open_keys = sorted(k for k, r in expect.items() if r is None)
    values = {k: float(i) / len(open_keys) for i, k in enumerate(open_keys)}  # rising with key order
    unscored = open_keys[5]
    for shard in (0, 1):
        keys = [k for k in open_keys if k.startswith(f"{shard:05d}") and k != unscored]
        pq.write_table(pa.table({"key": keys, "clip_score": pa.array([values[k] for k in keys], pa.float32())}),
                       scores / f"{shard:05d}.parquet")
    run_filter(FilterConfig(pool=pool, output_folder=str(tmp_path / "t"), distributor="inline", progress=False,
                            languages=["en"], clip_scores=str(scores), clip_threshold=0.25))
    got = decisions(tmp_path / "t")
    assert got[unscored]["reason"] == "clip_score_missing"
    for key in open_keys:
        if key != unscored:
            assert (got[key]["reason"] == "low_clip_score") == (np.float32(values[key]) < 0.25), key
            assert got[key]["clip_score"] == pytest.approx(values[key], abs=1e-6)
    run_filter(FilterConfig(pool=pool, output_folder=str(tmp_path / "f"), distributor="inline", progress=False,
                            languages=["en"], clip_scores=str(scores), clip_top_fraction=0.3))
    kept = [k for k, d in decisions(tmp_path / "f").items() if d["keep"]]
    scored = len(open_keys) - 1
    assert len(kept) == int(0.3 * scored)
    assert min(values[k] for k in kept) > max(values[k] for k in open_keys if k not in kept and k != unscored)


def _scene(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:300, 0:400] / 300.0
    field = sum(rng.uniform(20, 60) * np.cos(2 * np.pi * (rng.uniform(-2, 2) * xs + rng.uniform(-2, 2) * ys)
                                              + rng.uniform(0, 6)) for _ in range(5))
    return Image.fromarray(np.clip(120 + field, 0, 255).astype(np.uint8)).convert("RGB")


def test_decontamination_drops_look_alikes_of_the_eval_set(tmp_path):
    rows = []
    for i in range(40):
        image = _scene(i).resize((128, 96))
        rows.append(_row(0, i, phash=perceptual_signature(image)[0]))
    pool = write_pool(tmp_path / "pool", [rows])
    eval_tar = tmp_path / "eval.tar"
    with tarfile.open(eval_tar, "w") as tar:
        for i in (3, 17):  # eval images: the same scenes, re-rendered larger, border-padded to a square
            picture = _scene(i).resize((256, 192))
            canvas = Image.new("RGB", (256, 256), (255, 255, 255))
            canvas.paste(picture, (0, 32))
            data = io.BytesIO()
            canvas.save(data, "JPEG", quality=85)
            info = tarfile.TarInfo(f"eval{i:03d}.jpg")
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    run_filter(FilterConfig(pool=pool, output_folder=str(tmp_path / "dec"), distributor="inline", progress=False,
                            decontaminate=str(eval_tar)))
    got = decisions(tmp_path / "dec")
    contaminated = sorted(k for k, d in got.items() if d["reason"] == "eval_contaminated")
    assert contaminated == [sample_key(0, 3, ROWS), sample_key(0, 17, ROWS)]
