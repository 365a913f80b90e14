"""CLIP scoring of a pool (the embed stage, then cosines): Ray actors against a direct computation,
every row accounted for, resume, S3.

The pool is written by the project's own shard writer (the layout ingest commits):
three shards with planted trouble — failed downloads (no score row: they have no
sample), a corrupt JPEG, a sample without a caption, and a tar cut short in the
middle of a sample. The checkpoint is a seeded, untrained webclip-tiny saved by the
trainer's own ``save_checkpoint``: an untrained model scores as deterministically as
a trained one, and that is all these tests need.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from _train_fixtures import train_sample, write_tiny_model_config
from core import storage
from core.config import ConfigError, DataError, load_cli
from core.layout import committed_shards, sample_key
from core.shard_writer import ShardWriter
from filter import clipscore
from filter.clipscore import ClipScoreConfig, ClipScoreError, run_clipscore
from train import checkpoint as ckpt
from train import data as data_mod
from train import model as model_mod

ROWS = 10  # per shard
FAILED_ROWS = {3, 7}  # failed downloads: in the pool parquet, not in the tar
CORRUPT = (1, 5)  # (shard, row): image bytes that are not an image
NO_CAPTION = (1, 6)  # a success row whose sample has no caption member
CUT = (2, 4)  # the tar of shard 2 ends inside this row's image
SHARDS = 3
FLOAT16_COSINE = 2e-3  # scores are cosines of float16-stored embeddings; the direct computation is fp32


def key(shard: int, row: int) -> str:
    return sample_key(shard, row, ROWS)


def write_pool(folder: str) -> None:
    for shard in range(SHARDS):
        writer = ShardWriter(folder, shard, "jpg", [])
        for row in range(ROWS):
            jpeg, caption, _ = train_sample(seed=3, index=shard * ROWS + row, noise=0.3)
            record = {"key": key(shard, row), "url": f"http://127.0.0.1/{shard}/{row}.jpg", "caption": caption,
                      "status": "success"}  # fmt: skip
            if row in FAILED_ROWS:
                writer.add({**record, "status": "failed_to_download", "reason": "http_404"}, None)
                continue
            if (shard, row) == CORRUPT:
                jpeg = b"\xff\xd8\xff\xe0 this is not a JPEG"
            if (shard, row) == NO_CAPTION:
                record["caption"] = None
            writer.add(record, jpeg)
        writer.commit({"count": ROWS, "successes": ROWS - len(FAILED_ROWS)})
    cut_tar(os.path.join(folder, "00002.tar"), f"{key(*CUT)}.jpg")


def cut_tar(path: str, member: str) -> None:
    """Truncate the tar half-way through ``member``'s data, as a crashed copy would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    with open(path, "r+b") as handle:
        handle.truncate(info.offset_data + info.size // 2)


def success_keys(pool: str) -> list[str]:
    keys = []
    for shard in range(SHARDS):
        table = pq.read_table(os.path.join(pool, f"{shard:05d}.parquet"))
        keys += [r["key"] for r in table.to_pylist() if r["status"] == "success"]
    return keys


def read_all_scores(folder: str) -> dict[str, tuple[float | None, str | None]]:
    rows = {}
    for shard in range(SHARDS):
        table, _ = clipscore.read_scores(clipscore.score_path(folder, shard))
        assert table.schema.equals(clipscore.SCORE_SCHEMA, check_metadata=False)
        assert table["key"].to_pylist() == sorted(table["key"].to_pylist())
        for row in table.to_pylist():
            assert row["key"] not in rows
            rows[row["key"]] = (row["clip_score"], row["score_error"])
    return rows


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("clipscore") / "pool")
    write_pool(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint folder (latest.json) in the trainer's layout: {run_dir}/checkpoints."""
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(0)
    model = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, model, ckpt.TrainProgress(7, 0, 0), "webclip-tiny", model_mod.image_size_of(model), {})
    return folder


def config(pool: str, checkpoint: str, output: str, **overrides) -> ClipScoreConfig:
    values = dict(pool=pool, checkpoint=checkpoint, output_folder=output, distributor="inline", batch_size=4,
                  progress=False)
    return ClipScoreConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def ray_scores(pool, checkpoint, tmp_path_factory) -> tuple[str, object]:
    """Scores from the Ray actor path, on a local Ray instance: 2 actors of 1 thread each."""
    output = str(tmp_path_factory.mktemp("scores") / "ray")
    summary = run_clipscore(config(pool, checkpoint, output, workers=2, threads_per_worker=1, distributor="ray"))
    return output, summary


def direct_scores(pool: str, checkpoint: str, keys: list[str]) -> dict[str, float]:
    """The score computed by hand, in this process: tarfile, the trainer's decoding, open_clip's encoders."""
    loaded = ckpt.load_model(checkpoint)
    mean, std = model_mod.normaliser(loaded.model, torch.device("cpu"))
    members = {}
    for shard in range(SHARDS - 1):  # shard 2's tar is cut: tarfile would stop at it
        with tarfile.open(os.path.join(pool, f"{shard:05d}.tar")) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    out = {}
    with torch.inference_mode():
        for k in keys:
            image = data_mod.decode_image(members[f"{k}.jpg"], loaded.image_size)
            pixels = model_mod.normalise(image[None], mean, std)
            image_features = loaded.model.encode_image(pixels, normalize=True)
            text_features = loaded.model.encode_text(loaded.tokenizer([members[f"{k}.txt"].decode()]), normalize=True)
            out[k] = float((image_features * text_features).sum())
    return out


@pytest.mark.integration
def test_ray_actor_scores_equal_a_direct_computation(pool, checkpoint, ray_scores):
    output, summary = ray_scores
    rows = read_all_scores(output)
    sample = [key(0, 0), key(0, 9), key(1, 2), key(1, 8)]
    expected = direct_scores(pool, checkpoint, sample)
    for k in sample:
        assert rows[k][1] is None
        assert rows[k][0] == pytest.approx(expected[k], abs=FLOAT16_COSINE)
    scores = np.array([s for s, _ in rows.values() if s is not None])
    assert np.all(np.abs(scores) <= 1.0 + 1e-6) and np.std(scores) > 0  # cosines, and not all one value
    assert summary.shards_scored_now == SHARDS


@pytest.mark.integration
def test_one_row_per_pool_success_row_with_reasons(pool, ray_scores):
    output, summary = ray_scores
    rows = read_all_scores(output)
    assert sorted(rows) == sorted(success_keys(pool))  # failed downloads have no sample, hence no row
    errors = {k: e for k, (s, e) in rows.items() if e is not None}
    cut_keys = {key(2, r) for r in range(CUT[1], ROWS) if r not in FAILED_ROWS}
    assert errors == {
        key(*CORRUPT): "decode_error",
        key(*NO_CAPTION): "caption_missing",
        **{k: "shard_error" for k in cut_keys},  # the cut sample and all after it
    }
    assert all((s is None) == (k in errors) for k, (s, _) in rows.items())
    stats = storage.read_json(os.path.join(output, clipscore.STATS_NAME))
    assert stats["samples"] == summary.samples == len(rows)
    assert stats["scored"] == summary.scored == len(rows) - len(errors)
    assert stats["errors"] == {"caption_missing": 1, "decode_error": 1, "shard_error": len(cut_keys)}
    assert sum(stats["histogram"]["counts_by_lower_edge"].values()) == stats["scored"]
    assert stats["scorer"]["actors"] == 2 and stats["scorer"]["model"] == "webclip-tiny"
    assert stats["scorer"]["step"] == 7 and stats["checkpoint"].endswith("step_00000007.pt")


@pytest.mark.integration
def test_rerun_skips_scored_shards_and_redoes_a_deleted_one(pool, checkpoint, ray_scores, tmp_path):
    output = str(tmp_path / "scores")
    shutil.copytree(ray_scores[0], output)
    paths = [clipscore.score_path(output, s) for s in range(SHARDS)]
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    summary = run_clipscore(config(pool, checkpoint, output))
    assert summary.shards_scored_now == 0 and summary.samples == ray_scores[1].samples
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before

    os.remove(paths[1])  # rescored in a local process of its own (the model loaded there) ...
    os.remove(os.path.join(output, "embeddings", "done", "1.json"))  # ... once its embeddings are gone too
    summary = run_clipscore(config(pool, checkpoint, output, distributor="processes"))
    assert summary.shards_scored_now == 1
    assert {p: os.stat(p).st_mtime_ns for p in paths if p != paths[1]} == {p: before[p] for p in paths if p != paths[1]}
    fresh, reference = read_all_scores(output), read_all_scores(ray_scores[0])
    assert fresh.keys() == reference.keys()
    for k, (score, error) in reference.items():  # a local process, batch 4 == Ray actors, batch 4
        assert fresh[k][1] == error
        assert (fresh[k][0] is None) == (score is None)
        if score is not None:
            assert fresh[k][0] == pytest.approx(score, abs=1e-6)
    assert storage.read_json(os.path.join(output, clipscore.STATS_NAME))["this_run"]["shards"] == 1


@pytest.mark.integration
def test_a_folder_of_another_checkpoints_scores_is_refused(pool, checkpoint, ray_scores, tmp_path):
    other = str(tmp_path / "other" / "checkpoints")
    torch.manual_seed(1)
    model = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(other, model, ckpt.TrainProgress(9, 0, 0), "webclip-tiny", 48, {})
    output = str(tmp_path / "scores")
    shutil.copytree(ray_scores[0], output)
    with pytest.raises(ConfigError, match="holds scores of checkpoint"):
        run_clipscore(config(pool, other, output))


@pytest.mark.integration
def test_pool_and_scores_on_s3(pool, checkpoint, ray_scores, s3_env):
    fs, _ = storage.filesystem("s3://webclip")
    for name in sorted(os.listdir(pool)):
        fs.put(os.path.join(pool, name), f"webclip/clipscore-pool/{name}")
    remote_pool, remote_scores = "s3://webclip/clipscore-pool", "s3://webclip/clipscore-scores"
    summary = run_clipscore(config(remote_pool, checkpoint, remote_scores))
    assert summary.shards_scored_now == SHARDS
    reference = read_all_scores(ray_scores[0])
    for shard in range(SHARDS):
        table, info = clipscore.read_scores(clipscore.score_path(remote_scores, shard))
        assert info["model"] == "webclip-tiny"
        for row in table.to_pylist():
            score, error = reference[row["key"]]
            assert row["score_error"] == error
            assert (row["clip_score"] is None) == (score is None)
            if score is not None:
                assert row["clip_score"] == pytest.approx(score, abs=1e-6)
    assert storage.exists(storage.join(remote_scores, clipscore.STATS_NAME))
    assert run_clipscore(config(remote_pool, checkpoint, remote_scores)).shards_scored_now == 0


def test_a_shard_that_fails_is_reported_and_the_stats_wait_for_it(pool, checkpoint, tmp_path):
    broken = tmp_path / "pool"
    shutil.copytree(pool, broken)
    (broken / "00001.parquet").write_bytes(b"not parquet")  # the success rows cannot be read
    output = str(tmp_path / "scores")
    with pytest.raises(ClipScoreError, match="1 of 3 shard") as error:
        run_clipscore(config(str(broken), checkpoint, output))
    assert list(error.value.failed) == [1]
    assert sorted(os.listdir(output)) == ["00000.parquet", "00002.parquet", "embeddings"]  # no stats: not complete


def test_config_errors_name_the_option(pool, checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="output_folder"):
        config(pool, checkpoint, pool + "/")
    with pytest.raises(ConfigError, match="batch_size"):
        config(pool, checkpoint, str(tmp_path), batch_size=0)
    with pytest.raises(ConfigError, match="precision"):
        config(pool, checkpoint, str(tmp_path), device="cpu", precision="bf16")
    with pytest.raises(DataError, match="checkpoint"):
        run_clipscore(config(pool, str(tmp_path / "nothing"), str(tmp_path / "out")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no committed shard"):
        run_clipscore(config(str(empty), checkpoint, str(tmp_path / "out")))


def test_actors_is_the_old_name_of_workers():
    for actors, (distributor, workers) in (("0", ("inline", 0)), ("3", ("auto", 3)), ("-1", ("auto", 0))):
        argv = ["--pool", "p", "--checkpoint", "c", "--output_folder", "o", "--actors", actors]
        cfg, _ = load_cli(ClipScoreConfig, argv, "python -m filter.clipscore", "")
        assert (cfg.distributor, cfg.workers, cfg.actors) == (distributor, workers, None)
    with pytest.raises(ConfigError, match="actors=3 and workers=2"):
        config("p", "c", "o", actors=3, workers=2)


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        clipscore.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--pool", "--checkpoint", "--output_folder", "--actors", "--device", "clip_score", "score_error"):
        assert word in text


@pytest.mark.integration
def test_stats_marker_is_last(ray_scores):
    output, _ = ray_scores
    names = os.listdir(output)
    assert not [n for n in names if n.startswith(".")]  # no temporaries left
    assert committed_shards(output) == set()  # a score folder is never taken for a pool
    stats_time = os.stat(os.path.join(output, clipscore.STATS_NAME)).st_mtime_ns
    assert all(os.stat(os.path.join(output, n)).st_mtime_ns <= stats_time for n in names)
    assert json.loads(pq.read_schema(os.path.join(output, "00000.parquet")).metadata[clipscore.METADATA_KEY])[
        "checkpoint"
    ].endswith("step_00000007.pt")



def test_an_architecture_from_a_json_file_is_found_through_the_run_config(tmp_path):
    """A run trained with model.config_file: the checkpoint names the model, config.yaml its JSON."""
    name = "webclip-clipscore-fallback"  # registered nowhere before this test
    assert name not in model_mod.model_names()
    config_file = write_tiny_model_config(str(tmp_path), name)
    model_mod.register_model_config(write_tiny_model_config(str(tmp_path), "webclip-clipscore-twin"))
    torch.manual_seed(0)
    model = model_mod.create_model("webclip-clipscore-twin")  # the same architecture under another name
    run_dir = tmp_path / "run"
    ckpt.save_checkpoint(str(run_dir / "checkpoints"), model, ckpt.TrainProgress(1, 0, 0), name, 32, {})
    (run_dir / "config.yaml").write_text(f"model:\n  name: {name}\n  config_file: {config_file}\n")
    loaded = ckpt.load_model(str(run_dir / "checkpoints"))
    assert loaded.name == name and loaded.image_size == 32 and loaded.step == 1
    for ours, theirs in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(ours, theirs)
