"""The embed stage: open_clip's encoders on the same inputs, the contract's layout, resume, determinism, S3.

Pool shards are written by the project's own shard writer (ingest's layout) with planted
trouble: a failed download (no sample), a corrupt JPEG, a sample without a caption. Train
shards come from the trainer's fixtures (with ``manifest.json``); a hand-made tar carries
hostile members. The model is a seeded, untrained webclip-tiny saved by the trainer's
``save_checkpoint``: an untrained model embeds as deterministically as a trained one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from _train_fixtures import train_sample, write_tar, write_train_shards
from apply import embeddings as emb
from apply.embed import EmbedConfig, run_embed, worker_plan
from core import storage
from core.config import ConfigError, DataError, load_cli
from core.layout import sample_key
from core.shard_writer import ShardWriter
from train import checkpoint as ckpt
from train import model as model_mod
from train.data import decode_image

ROWS, SHARDS = 8, 3
FAILED = (0, 3)  # (shard, row): a failed download, in the parquet only
CORRUPT = (1, 2)  # image bytes that are not an image
NO_CAPTION = (2, 5)
FLOAT16 = 2e-3  # float16 keeps ~3 decimal digits of a unit vector's components


def key(shard: int, row: int) -> str:
    return sample_key(shard, row, ROWS)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("embed") / "pool")
    for shard in range(SHARDS):
        writer = ShardWriter(folder, shard, "jpg", [])
        for row in range(ROWS):
            jpeg, caption, _ = train_sample(seed=4, index=shard * ROWS + row, noise=0.3)
            record = {"key": key(shard, row), "url": f"http://127.0.0.1/{shard}/{row}.jpg", "caption": caption,
                      "status": "success", "width": 128, "height": 128}  # fmt: skip
            if (shard, row) == FAILED:
                writer.add({**record, "status": "failed_to_download", "reason": "http_404"}, None)
                continue
            if (shard, row) == CORRUPT:
                jpeg = b"\xff\xd8\xff\xe0 not a JPEG"
            if (shard, row) == NO_CAPTION:
                record["caption"] = None
            writer.add(record, jpeg)
        writer.commit({"count": ROWS})
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(0)
    model = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, model, ckpt.TrainProgress(3, 0, 0), "webclip-tiny", model_mod.image_size_of(model), {})
    return folder


def config(shards: str, checkpoint: str, output: str, **overrides) -> EmbedConfig:
    values = dict(shards=shards, checkpoint=checkpoint, output_folder=output, distributor="inline", batch_size=3,
                  progress=False)
    return EmbedConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def embedded(pool, checkpoint, tmp_path_factory) -> tuple[str, object]:
    output = str(tmp_path_factory.mktemp("out") / "embeddings")
    return output, run_embed(config(pool, checkpoint, output))


def read_folder(folder: str) -> dict[int, tuple[bytes, bytes, list[dict]]]:
    manifest = emb.read_manifest(folder)
    out = {}
    for n in map(int, manifest["shards"]):
        with open(emb.image_path(folder, n), "rb") as a, open(emb.text_path(folder, n), "rb") as b:
            out[n] = (a.read(), b.read(), pq.read_table(emb.metadata_path(folder, n)).to_pylist())
    return out


def test_embeddings_equal_open_clips_encoders_on_the_same_inputs(pool, checkpoint, embedded):
    output, _ = embedded
    module = ckpt.load_model(checkpoint).model
    tokenizer = open_clip.get_tokenizer("webclip-tiny")
    mean, std = model_mod.normaliser(module, torch.device("cpu"))
    size = model_mod.image_size_of(module)
    for shard in range(SHARDS):
        images, texts = emb.read_array(emb.image_path(output, shard)), emb.read_array(emb.text_path(output, shard))
        rows = emb.read_metadata(output, shard).to_pylist()
        assert images.dtype == texts.dtype == np.float16 and images.shape == texts.shape == (len(rows), 128)
        jpegs = {}
        for row in range(ROWS):
            jpegs[key(shard, row)] = train_sample(seed=4, index=shard * ROWS + row, noise=0.3)[:2]
        with torch.no_grad():
            pixels = torch.stack([decode_image(jpegs[r["key"]][0], size) for r in rows])
            ref_images = module.encode_image(((pixels.float() / 255.0) - mean) / std, normalize=True)
            ref_texts = module.encode_text(tokenizer([jpegs[r["key"]][1] for r in rows]), normalize=True)
        np.testing.assert_allclose(images.astype(np.float32), ref_images.numpy(), atol=FLOAT16)
        np.testing.assert_allclose(texts.astype(np.float32), ref_texts.numpy(), atol=FLOAT16)
        np.testing.assert_allclose(np.linalg.norm(images.astype(np.float32), axis=1), 1.0, atol=FLOAT16)
        assert [r["caption"] for r in rows] == [jpegs[r["key"]][1] for r in rows]


def test_the_layout_rows_metadata_and_what_was_left_out(pool, embedded):
    output, summary = embedded
    left_out = {key(*FAILED), key(*CORRUPT), key(*NO_CAPTION)}
    for shard in range(SHARDS):
        rows = emb.read_metadata(output, shard).to_pylist()
        assert [r["key"] for r in rows] == [key(shard, i) for i in range(ROWS) if key(shard, i) not in left_out]
        for r in rows:
            assert r["url"] == f"http://127.0.0.1/{shard}/{int(r['key'][5:])}.jpg"
            assert r["shard"] == storage.join(pool, f"{shard:05d}.tar")
            assert (r["image_width"], r["image_height"]) == (128, 128)
    assert storage.read_json(emb.done_path(output, 1))["failed"] == {key(*CORRUPT): "decode_error"}
    manifest = emb.read_manifest(output)
    assert manifest["skipped"] == summary.skipped == {"decode_error": 1, "caption_missing": 1}
    assert manifest["rows"] == summary.rows == SHARDS * ROWS - 3
    assert manifest["shards"] == {str(s): {"tar": storage.join(pool, f"{s:05d}.tar"), "rows": ROWS - 1}
                                  for s in range(SHARDS)}  # fmt: skip
    described = (manifest["model"], manifest["step"], manifest["dim"], manifest["image_size"])
    assert described == ("webclip-tiny", 3, 128, 48)
    assert manifest["checkpoint"].endswith("step_00000003.pt") and manifest["source"] == pool
    names = {os.path.relpath(os.path.join(d, f), output) for d, _, files in os.walk(output) for f in files}
    assert names == {emb.MANIFEST} | {f"{kind}/{kind}_{s}.npy" for kind in ("img_emb", "text_emb") for s in range(3)} \
        | {f"metadata/metadata_{s}.parquet" for s in range(3)} | {f"done/{s}.json" for s in range(3)}
    marker = os.stat(os.path.join(output, emb.MANIFEST)).st_mtime_ns  # written last
    assert all(os.stat(os.path.join(output, n)).st_mtime_ns <= marker for n in names)


def test_local_processes_give_byte_identical_files(pool, checkpoint, embedded, tmp_path):
    output = str(tmp_path / "processes")
    summary = run_embed(config(pool, checkpoint, output, distributor="processes", workers=2))
    assert summary.info["workers"] == 2 and summary.info["distributor"] == "processes"
    assert read_folder(output) == read_folder(embedded[0])


def test_rerun_skips_done_shards_and_redoes_a_missing_one(pool, checkpoint, embedded, tmp_path):
    output = str(tmp_path / "again")
    shutil.copytree(embedded[0], output)
    files = [emb.image_path(output, s) for s in range(SHARDS)]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    summary = run_embed(config(pool, checkpoint, output))
    assert summary.shards_now == 0 and summary.rows == embedded[1].rows
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    os.remove(emb.done_path(output, 1))  # a shard killed before its marker: redone, and only it
    summary = run_embed(config(pool, checkpoint, output))
    assert summary.shards_now == 1 and summary.rows_now == ROWS - 1
    assert os.stat(files[0]).st_mtime_ns == before[files[0]] and os.stat(files[1]).st_mtime_ns != before[files[1]]
    assert read_folder(output) == read_folder(embedded[0])
    with pytest.raises(ConfigError, match=r"other settings: max_image_pixels \(67108864 -> 1000\)"):
        run_embed(config(pool, checkpoint, output, max_image_pixels=1000))  # would skip other samples
    assert read_folder(output) == read_folder(embedded[0])


def test_a_folder_of_another_checkpoint_or_other_shards_is_refused(pool, checkpoint, embedded, tmp_path):
    other = str(tmp_path / "other" / "checkpoints")
    torch.manual_seed(1)
    ckpt.save_checkpoint(other, model_mod.create_model("webclip-tiny"), ckpt.TrainProgress(9, 0, 0), "webclip-tiny",
                         48, {})  # fmt: skip
    output = str(tmp_path / "mixed")
    shutil.copytree(embedded[0], output)
    with pytest.raises(ConfigError, match="holds embeddings of checkpoint"):
        run_embed(config(pool, other, output))
    os.remove(os.path.join(output, emb.MANIFEST))
    with pytest.raises(ConfigError, match="shard 0 was embedded with checkpoint"):
        run_embed(config(pool, other, output))
    copy = str(tmp_path / "pool-copy")
    shutil.copytree(pool, copy)
    with pytest.raises(ConfigError, match="embedded with tar"):
        run_embed(config(copy, checkpoint, output))


def test_train_shards_with_a_manifest_and_hostile_members_on_s3(checkpoint, tmp_path, s3_env):
    train = str(tmp_path / "train")
    write_train_shards(train, samples=10, per_shard=5, seed=2)
    write_tar(str(tmp_path / "train" / "00007.tar"), [("x.jpg", b"ignored: not in the manifest")])
    local = str(tmp_path / "local")
    run_embed(config(train, checkpoint, local))
    assert sorted(emb.read_manifest(local)["shards"]) == ["0", "1"]  # the manifest's shards, not 00007.tar

    loose = tmp_path / "loose"  # no manifest, no markers: every tar; members from no writer of ours
    loose.mkdir()
    jpeg, caption, _ = train_sample(seed=2, index=0, noise=0.0)
    write_tar(str(loose / "00003.tar"), [
        ("a.jpg", jpeg), ("a.txt", b"<script>alert(1)</script>"), ("a.json", b"[1, 2]"),
        ("b.txt", caption.encode()),  # no image
        ("c.jpg", jpeg), ("c.txt", caption.encode()), ("c.json", b'{"url": 5, "width": true, "height": -1}'),
    ])  # fmt: skip
    fs, _ = storage.filesystem("s3://webclip")
    fs.put(str(loose / "00003.tar"), "webclip/embed-loose/00003.tar")
    for name in os.listdir(train):
        fs.put(os.path.join(train, name), f"webclip/embed-train/{name}")
    remote = "s3://webclip/embed-out"
    run_embed(config("s3://webclip/embed-loose", checkpoint, remote))
    rows = emb.read_metadata(remote, 3).to_pylist()
    assert [(r["key"], r["caption"], r["url"], r["image_width"]) for r in rows] == [
        ("a", "<script>alert(1)</script>", None, None), ("c", caption, None, None)]
    assert emb.read_manifest(remote)["skipped"] == {"image_missing": 1}
    assert emb.read_array(emb.image_path(remote, 3)).shape == (2, 128)

    remote_train = "s3://webclip/embed-train-out"
    run_embed(config("s3://webclip/embed-train", checkpoint, remote_train))
    for n in (0, 1):
        assert emb.read_array(emb.image_path(remote_train, n)).tobytes() == emb.read_array(
            emb.image_path(local, n)).tobytes()
        assert emb.read_metadata(remote_train, n)["key"].to_pylist() == emb.read_metadata(local, n)["key"].to_pylist()
    assert emb.read_metadata(remote_train, 0)["shard"].to_pylist()[0] == "s3://webclip/embed-train/00000.tar"


def test_bad_options_and_missing_inputs_are_one_line_errors(pool, checkpoint, tmp_path):
    with pytest.raises(ConfigError) as error:  # every bad setting at once
        load_cli(EmbedConfig, ["--shards", pool, "--output_folder", pool, "--batch_size", "0", "--device", "tpu"],
                 "python -m apply.embed", "")
    for word in ("checkpoint", "output_folder", "batch_size", "device"):
        assert word in str(error.value)
    with pytest.raises(DataError, match="checkpoint"):
        run_embed(config(pool, str(tmp_path / "nothing"), str(tmp_path / "out")))
    with pytest.raises(DataError, match="no manifest.json and no"):
        run_embed(config(str(tmp_path), checkpoint, str(tmp_path / "out")))
    weights = str(tmp_path / "open_clip_model.bin")  # open_clip weights without --model
    torch.save(ckpt.load_model(checkpoint).model.state_dict(), weights)
    with pytest.raises(DataError, match="--model"):
        run_embed(config(pool, weights, str(tmp_path / "out")))
    result = subprocess.run([sys.executable, "-m", "apply.embed", "--checkpoint", checkpoint, "--shards",
                             str(tmp_path / "absent"), "--output_folder", str(tmp_path / "o")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "absent" in result.stderr


def test_help_explains_the_layout(capsys):
    from apply.embed import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--checkpoint", "--shards", "--output_folder", "--batch_size", "--workers", "img_emb",
                 "embeddings.json"):
        assert word in text


def test_worker_plan_per_machine_and_cluster():
    def plan(cpus, gpus, **overrides):
        return worker_plan(config("s", "c", "o", **overrides), cpus, gpus)

    assert plan(2, 0) == (1, 1, {"num_cpus": 1.0})  # one torch thread per CPU worker: bytes never depend on it
    assert plan(16, 0) == (15, 1, {"num_cpus": 1.0})
    assert plan(16, 0, threads_per_worker=4) == (15, 4, {"num_cpus": 16 / 15})
    assert plan(16, 4) == (4, 4, {"num_cpus": 4.0, "num_gpus": 1.0})
    assert plan(16, 4, gpus_per_worker=0.5) == (8, 2, {"num_cpus": 2.0, "num_gpus": 0.5})
    assert plan(16, 4, device="cpu") == (15, 1, {"num_cpus": 1.0})
    assert plan(2, 0, workers=4) == (4, 1, {"num_cpus": 0.5})  # more workers than cores still fit
    with pytest.raises(ConfigError, match="no GPU"):
        plan(16, 0, device="cuda")
    with pytest.raises(ConfigError, match="precision"):
        plan(16, 0, precision="fp16")


def test_the_embeddings_json_is_plain_json(embedded):
    with open(os.path.join(embedded[0], emb.MANIFEST)) as handle:
        assert set(json.load(handle)) >= {"checkpoint", "model", "step", "dim", "image_size", "shards", "rows",
                                          "source"}  # fmt: skip


def test_shards_with_nothing_to_embed_end_with_the_reason_and_exit_1(checkpoint, tmp_path):
    """Success at nothing is not success: tars of captions without images name the reason, exit 1."""
    shards = tmp_path / "captions_only"
    shards.mkdir()
    write_tar(str(shards / "00000.tar"), [(f"{i:04d}.txt", b"a caption") for i in range(3)])
    result = subprocess.run([sys.executable, "-m", "apply.embed", "--checkpoint", checkpoint, "--shards",
                             str(shards), "--output_folder", str(tmp_path / "out"), "--distributor", "processes",
                             "--workers", "1"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "0 of 3 rows embedded; all 3 rows image_missing" in result.stderr
    # quiet: no traceback, and no open_clip notice about random weights from the worker that loaded the checkpoint
    assert "Traceback" not in result.stderr and "No pretrained weights" not in result.stderr
