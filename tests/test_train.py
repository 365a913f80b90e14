"""The trainer: config checks, the loss, the streaming input, a short run, zero-shot eval."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter

import open_clip
import pytest
import torch
import torch.nn.functional as F

from infra.local import composition, scenes
import _train_fixtures as fx
from train import checkpoint as ckpt
from train import data as data_mod
from train import evaluate, fast, throughput, zeroshot
from train.__main__ import main as train_main
from core.errors import DataError
from train.config import ConfigError, load_config
from train.loop import cosine_lr, param_groups, train
from train.loss import clip_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LINE = re.compile(r"^zero-shot top1=(\d\.\d\d|n/a) top5=(\d\.\d\d|n/a) \(48 classes\)$")


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_tar(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("eval") / "eval.tar")
    fx.write_eval_tar(path, per_class=1)
    return path


def _tokenize(texts: list[str]) -> torch.Tensor:
    return open_clip.tokenize(texts, context_length=20)


def _keys(folder: str) -> list[str]:
    keys = []
    for path in sorted(os.listdir(folder)):
        if path.endswith(".tar"):
            with tarfile.open(os.path.join(folder, path)) as tar:
                keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


# -- config ----------------------------------------------------------------------------


def test_config_rejects_bad_values_with_their_names(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=-3: must be a positive integer"):
        load_config(None, ["batch_size=-3", "steps=10"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["steps=0", "optim.lr=-1", "precision=fp8", "data.workers=-1"])
    message = str(info.value)
    for expected in ("steps=0", "optim.lr=-1.0", "precision='fp8'", "data.workers=-1"):
        assert expected in message  # every bad value in one message
    with pytest.raises(ConfigError, match="unknown setting optim.learning_rate"):
        load_config(None, ["optim.learning_rate=1", "steps=1"])
    with pytest.raises(ConfigError, match="set only one"):
        load_config(None, ["steps=10", "epochs=2"])
    with pytest.raises(ConfigError, match="set one"):
        load_config(None, [])
    with pytest.raises(ConfigError, match=r"batch_size='big': must be an integer"):
        load_config(None, ["batch_size=big", "steps=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["steps=1", "batch_size=0", "precision=fp16", "device=cpu", "accum_steps=0"])
    for expected in ("batch_size=0", "precision='fp16' with device='cpu'", "accum_steps=0"):
        assert expected in str(info.value)
    with pytest.raises(ConfigError, match=r"batch_size=10: must be a multiple of accum_steps=4"):
        load_config(None, ["steps=1", "batch_size=10", "accum_steps=4"])
    with pytest.raises(ConfigError, match=r"compile='maybe': must be true or false"):
        load_config(None, ["steps=1", "compile=maybe"])
    with pytest.raises(ConfigError, match="eval_every=5 but data.eval_tar and data.eval_shards are null"):
        load_config(None, ["steps=1", "eval_every=5", "data.eval_tar=null"])


def test_cli_reports_bad_values_before_any_work(tmp_path, capsys, shards_dir):
    """Exit code 2 and one line naming the value, in both override styles; nothing is written."""
    run_dir = tmp_path / "never"
    cases = [
        (["--steps", "1", "--optim.lr", "-0.5"], "optim.lr=-0.5"),
        (["--set", "steps=1", "--set", "precision=fp8"], "precision='fp8'"),
        (["--steps=1", "--learning_rate", "1"], "unknown setting learning_rate"),
        (["--steps", "1", "--data.train_shards", shards_dir, "--model.name", "ViT-Nope-32"],
         "model.name='ViT-Nope-32': unknown to open_clip"),
        (["--steps", "1", "--data.train_shards", str(tmp_path / "absent")], "no manifest.json and no *.tar"),
        (["--steps", "1", "--data.train_shards", shards_dir, "--data.eval_tar", "null",
          "--resume", str(tmp_path / "step_00000009.pt")], "no such checkpoint"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert train_main([*argv, "--run_dir", str(run_dir)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("python -m train: error: ") and expected in err, (argv, err)
    assert not run_dir.exists()


def test_flat_flags_and_resume_flag_become_settings():
    from core.config import load_cli
    from train.config import TrainConfig

    config, _ = load_cli(TrainConfig, ["--steps", "7", "--optim.lr=2e-3", "--data.resampled", "true", "--resume",
                                       "latest", "--data.train_shards", "shards"], "python -m train", "")
    assert (config.steps, config.optim.lr, config.data.resampled, config.resume) == (7, 2e-3, True, "latest")


def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 1e-3\nsteps: 5\ndata:\n  train_shards: shards\n  eval_tar: null\n")
    config = load_config(str(path), ["batch_size=32", "optim.warmup_steps=2"])
    assert config.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; still a float
    assert (config.steps, config.batch_size, config.optim.warmup_steps) == (5, 32, 2)
    assert config.data.eval_tar is None
    assert config.checkpoint_dir == os.path.join(config.run_dir, "checkpoints")


def test_demo_config_is_valid():
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "train.yaml"))
    assert config.data.train_shards == "data/demo/train"
    assert config.data.eval_tar == "data/demo/eval/eval.tar"
    assert config.run_dir == "runs/demo"


def test_cosine_schedule():
    lrs = [cosine_lr(s, base_lr=1.0, warmup_steps=10, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert cosine_lr(110, base_lr=1.0, warmup_steps=10, total_steps=110, min_ratio=0.1) == pytest.approx(0.1)


# -- loss ------------------------------------------------------------------------------


def _naive_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * images @ texts.T
    labels = torch.arange(len(images))
    total = 0.0
    for i in range(len(images)):  # row by row, as written in the CLIP paper
        total += -F.log_softmax(logits[i], 0)[labels[i]] - F.log_softmax(logits[:, i], 0)[labels[i]]
    return total / (2 * len(images))


def test_loss_matches_naive_full_matrix():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(12, 16), dim=-1)
    texts = F.normalize(torch.randn(12, 16), dim=-1)
    loss = clip_loss(images, texts, torch.tensor(14.3))
    assert loss.item() == pytest.approx(_naive_loss(images, texts, 14.3).item(), rel=1e-5)


def test_loss_clamps_the_temperature_at_100():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(8, 16), dim=-1)
    texts = F.normalize(torch.randn(8, 16), dim=-1)
    clamped = clip_loss(images, texts, torch.tensor(1000.0))
    assert clamped.item() == pytest.approx(_naive_loss(images, texts, 100.0).item(), rel=1e-5)
    log_scale = torch.tensor(math.log(1000.0), requires_grad=True)
    clip_loss(images, texts, log_scale.exp()).backward()
    assert log_scale.grad == 0  # above the cap the temperature gets no gradient


# -- data ------------------------------------------------------------------------------


def test_list_shards_manifest_and_fallback(shards_dir, tmp_path):
    shards = data_mod.list_shards(shards_dir)
    assert [os.path.basename(s.path) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert data_mod.total_samples(shards) == 24
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("00001.tar", "00000.tar"):
        (bare / name).write_bytes(open(os.path.join(shards_dir, name), "rb").read())
    listed = data_mod.list_shards(str(bare))
    assert [os.path.basename(s.path) for s in listed] == ["00000.tar", "00001.tar"]
    assert data_mod.total_samples(listed) is None
    with pytest.raises(FileNotFoundError, match="no manifest.json and no"):
        data_mod.list_shards(str(tmp_path / "empty"))
    (bare / "manifest.json").write_text(json.dumps({"shards": [{"name": "../etc/passwd", "count": 1}]}))
    with pytest.raises(ValueError, match="not a plain file name"):
        data_mod.list_shards(str(bare))


def _stream(shards, **kwargs) -> data_mod.ShardStream:
    defaults = dict(batch_size=5, image_size=32, tokenize=_tokenize, seed=0, shuffle_buffer=10, repeat=False)
    return data_mod.ShardStream(shards, **{**defaults, **kwargs})


def test_stream_batches_are_uint8_and_tokenised(shards_dir):
    batches = list(_stream(data_mod.list_shards(shards_dir)))
    assert [len(b.keys) for b in batches] == [5, 5, 5, 5, 4]
    first = batches[0]
    assert first.images.dtype == torch.uint8 and first.images.shape == (5, 3, 32, 32)
    assert first.texts.dtype == torch.long and first.texts.shape == (5, 20)
    assert sorted(k for b in batches for k in b.keys) == _keys(shards_dir)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    jpeg, caption, _ = fx.train_sample(0, 0, 0.0)
    good = [("a.jpg", jpeg), ("a.txt", caption.encode()), ("a.json", b"{}")]
    members = [
        *good,
        ("b.jpg", b"\xff\xd8\xff not a jpeg"), ("b.txt", b"a red circle"),  # bad image
        ("c.jpg", jpeg),  # no caption
        ("d.jpg", jpeg), ("d.txt", b"\xff\xfe caf\xe9"),  # not UTF-8
        ("e.txt", b"only a caption"),  # no image
        ("f.jpg", jpeg[: len(jpeg) // 3]), ("f.txt", b"a truncated jpeg"),  # truncated image
        ("g.jpg", jpeg), ("g.txt", b"   \n"),  # empty caption
        ("h.jpg", jpeg), ("h.txt", caption.encode()),
    ]  # fmt: skip
    fx.write_tar(str(tmp_path / "00000.tar"), members)
    # A shard cut off in the middle of a member: what it held before is kept.
    whole = tmp_path / "whole.tar.tmp"
    fx.write_tar(str(whole), [*good, ("z.jpg", jpeg), ("z.txt", b"cut")])
    cut = whole.read_bytes().index(b"z.jpg") + 512 + len(jpeg) // 2  # inside z.jpg's data
    (tmp_path / "00001.tar").write_bytes(whole.read_bytes()[:cut])

    batches = list(_stream(data_mod.list_shards(str(tmp_path)), batch_size=100))
    keys = sorted(k for b in batches for k in b.keys)
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert keys == ["a", "a", "h"]
    assert skipped == {
        "decode_error": 2,  # b, f
        "caption_missing": 2,  # c, g
        "caption_not_utf8": 1,  # d
        "image_missing": 1,  # e
        "shard_error": 1,  # 00001.tar ends mid-member
    }


def test_split_by_rank_and_worker_covers_every_sample_once(shards_dir):
    shards = data_mod.list_shards(shards_dir)
    seen: list[str] = []
    for rank in range(2):
        stream = _stream(shards, rank=rank, world_size=2, batch_size=3)
        loader = data_mod.make_loader(stream, workers=2)
        seen += [k for batch in loader for k in batch.keys]
    assert sorted(seen) == _keys(shards_dir)  # 3 shards < 4 readers: the per-sample split


def test_split_by_shard_when_there_are_enough(tmp_path):
    fx.write_train_shards(str(tmp_path), samples=24, per_shard=4, seed=5, noise=0.0)
    shards = data_mod.list_shards(str(tmp_path))
    per_reader = []
    for rank in range(2):
        loader = data_mod.make_loader(_stream(shards, rank=rank, world_size=2), workers=2)
        per_reader.append([k for batch in loader for k in batch.keys])
    assert sorted(per_reader[0] + per_reader[1]) == _keys(str(tmp_path))
    assert len(per_reader[0]) == len(per_reader[1]) == 12


def test_stream_is_seeded(shards_dir):
    shards = data_mod.list_shards(shards_dir)

    def order(seed: int, start_epoch: int = 0) -> list[str]:
        stream = _stream(shards, seed=seed, start_epoch=start_epoch)
        return [k for b in stream for k in b.keys]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, start_epoch=1)


def test_repeat_flows_across_epochs(shards_dir):
    stream = _stream(data_mod.list_shards(shards_dir), batch_size=7, repeat=True)
    batches = [b for _, b in zip(range(8), stream)]  # 56 samples from 24: past two epochs
    assert all(len(b.keys) == 7 for b in batches)
    assert batches[-1].epoch == 2
    counts = Counter(k for b in batches for k in b.keys)
    assert set(counts) == set(_keys(shards_dir)) and max(counts.values()) <= 3


# -- a short run end to end ----------------------------------------------------------------


def _run_config(tmp_path, shards_dir, eval_tar, tiny_model, name: str, *extra: str):
    return load_config(
        None,
        [
            f"data.train_shards={shards_dir}",
            f"data.eval_tar={eval_tar}",
            "data.workers=0",
            "data.shuffle_buffer=8",
            f"model.config_file={tiny_model}",
            "model.name=webclip-test-tiny",
            "batch_size=8",
            "steps=4",
            "log_every=1",
            "optim.warmup_steps=2",
            "checkpoint.every_steps=2",
            "threads=1",
            f"run_dir={tmp_path / name}",
            *extra,
        ],
    )


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        return [record["loss"] for record in map(json.loads, handle) if "loss" in record]


def test_short_run_writes_open_clip_checkpoints(tmp_path, shards_dir, eval_tar, tiny_model, capsys):
    config = _run_config(tmp_path, shards_dir, eval_tar, tiny_model, "a")
    result = train(config)
    out = capsys.readouterr().out.strip().splitlines()
    assert LINE.match(out[-1]) and out[-1] == result.line()

    folder = config.checkpoint_dir
    latest = json.load(open(os.path.join(folder, "latest.json")))
    assert latest["checkpoint"] == "step_00000004.pt" and latest["samples_seen"] == 32
    assert os.path.exists(os.path.join(folder, "step_00000002.pt"))
    path = os.path.join(folder, latest["checkpoint"])
    model, _, preprocess = open_clip.create_model_and_transforms("webclip-test-tiny", pretrained=path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    state = torch.load(os.path.join(folder, latest["state"]), weights_only=True)
    assert state["progress"]["step"] == 4 and "state" in state["optimizer"]

    figures = json.load(open(os.path.join(config.run_dir, "zeroshot.json")))
    assert figures["top1"] == round(result.top1, 4) and figures["train"]["steps"] == 4
    # The demo's figures come from the per-image scores the trainer writes beside them.
    demo = composition.figures(config.run_dir, os.path.dirname(eval_tar))
    assert demo.n_seen + demo.n_unseen == 48 and demo.n_unseen == 6
    assert demo.seen * 42 + demo.unseen * 6 == pytest.approx(result.top1 * 48)
    assert len(_losses(config.run_dir)) == 4
    record = json.loads(open(os.path.join(config.run_dir, "log.jsonl")).readline())
    assert record["samples_per_s"] > 0 and record["samples_per_s_per_device"] == record["samples_per_s"]
    assert record["tflops_per_s"] > 0 and record["mfu"] is None  # CPU: FLOP/s, but no peak to divide by
    events = os.listdir(os.path.join(config.run_dir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)

    # Standalone evaluation of the saved checkpoint gives the same figures.
    zeroshot.main(["--checkpoint", path, "--model", "webclip-test-tiny", "--eval", eval_tar])
    assert capsys.readouterr().out.strip().splitlines()[-1] == result.line()


def test_same_data_and_seed_give_the_same_losses(tmp_path, shards_dir, eval_tar, tiny_model):
    first = _run_config(tmp_path, shards_dir, None, tiny_model, "b", "data.eval_tar=null")
    second = _run_config(tmp_path, shards_dir, None, tiny_model, "c", "data.eval_tar=null")
    other = _run_config(tmp_path, shards_dir, None, tiny_model, "d", "data.eval_tar=null", "seed=1")
    for config in (first, second, other):
        train(config)
    assert _losses(first.run_dir) == _losses(second.run_dir)
    assert _losses(first.run_dir) != _losses(other.run_dir)


def test_missing_inputs_fail_before_training(tmp_path, shards_dir, tiny_model):
    config = _run_config(tmp_path, str(tmp_path / "nowhere"), None, tiny_model, "e", "data.eval_tar=null")
    with pytest.raises(DataError, match="no manifest.json and no"):
        train(config)
    config = _run_config(tmp_path, shards_dir, str(tmp_path / "no.tar"), tiny_model, "f")
    with pytest.raises(DataError, match="data.eval_tar=.*no such file"):
        train(config)
    assert not os.path.exists(tmp_path / "f")  # nothing was started


@pytest.mark.integration
def test_shards_and_checkpoints_on_s3(tmp_path, shards_dir, eval_tar, tiny_model, s3_env, capsys):
    """The same run reading shards from and writing checkpoints to a real S3 server."""
    from core import storage

    for name in sorted(os.listdir(shards_dir)):
        with open(os.path.join(shards_dir, name), "rb") as src, storage.atomic_write(
            f"s3://webclip/train-test/shards/{name}"
        ) as dst:
            dst.write(src.read())
    for name in sorted(os.listdir(os.path.dirname(eval_tar))):  # the tar and its class names and templates
        with open(os.path.join(os.path.dirname(eval_tar), name), "rb") as src, storage.atomic_write(
            f"s3://webclip/train-test/{name}"
        ) as dst:
            dst.write(src.read())
    config = _run_config(
        tmp_path, "s3://webclip/train-test/shards", "s3://webclip/train-test/eval.tar", tiny_model, "s3",
        "checkpoint.dir=s3://webclip/train-test/checkpoints",
    )  # fmt: skip
    result = train(config)
    latest = storage.read_json("s3://webclip/train-test/checkpoints/latest.json")
    assert latest["step"] == 4
    path = f"s3://webclip/train-test/checkpoints/{latest['checkpoint']}"
    capsys.readouterr()
    zeroshot.main(["--checkpoint", path, "--model", "webclip-test-tiny", "--eval", config.data.eval_tar])
    assert capsys.readouterr().out.strip().splitlines()[-1] == result.line()

    # Resume from the step-2 checkpoint on S3, into a second S3 folder: the same step 4.
    resumed = _run_config(
        tmp_path, "s3://webclip/train-test/shards", None, tiny_model, "s3-resumed", "data.eval_tar=null",
        "checkpoint.dir=s3://webclip/train-test/resumed", "resume=s3://webclip/train-test/checkpoints/step_00000002.pt",
    )  # fmt: skip
    train(resumed)
    assert storage.read_json("s3://webclip/train-test/resumed/latest.json")["step"] == 4
    for name in ("checkpoints", "resumed"):
        with storage.open_file(f"s3://webclip/train-test/{name}/step_00000004.pt") as src:
            (tmp_path / f"{name}.pt").write_bytes(src.read())
    _assert_same_params(str(tmp_path / "checkpoints.pt"), str(tmp_path / "resumed.pt"))
    assert _losses(resumed.run_dir) == _losses(config.run_dir)[2:]
    assert ckpt.resolve_resume("latest", "s3://webclip/train-test/resumed").endswith("resumed/step_00000004.pt")


def test_a_transform_that_raises_is_counted_not_fatal(shards_dir, monkeypatch):
    real = data_mod.decode_image
    calls = Counter()

    def flaky(data, size, max_pixels=1 << 26):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise ZeroDivisionError("a transform bug")
        return real(data, size, max_pixels)

    monkeypatch.setattr(data_mod, "decode_image", flaky)
    batches = list(_stream(data_mod.list_shards(shards_dir), batch_size=6))
    skipped = Counter()
    for batch in batches:
        skipped.update(batch.skipped)
    assert skipped == {"transform_error": 4} and sum(len(b.keys) for b in batches) == 20


def test_skip_codes_are_the_projects_reasons():
    from core.reasons import Reason, Stage

    for code in (data_mod.Skip.IMAGE_MISSING, data_mod.Skip.SHARD_ERROR, data_mod.Skip.TRANSFORM_ERROR):
        assert Reason(code).stage is Stage.TRAIN and Reason(code).description
    assert {v for k, v in vars(data_mod.Skip).items() if k.isupper()} <= {r.value for r in Reason}


def _img2dataset_shard(path: str, start: int, count: int, formats=("jpg",)) -> None:
    """img2dataset's own layout: 9-digit keys, .jpg|.webp|.png + .txt + .json, no manifest."""
    import io as io_mod

    from PIL import Image

    members = []
    for i in range(start, start + count):
        jpeg, caption, meta = fx.train_sample(11, i, 0.0)
        fmt = formats[i % len(formats)]
        data = jpeg
        if fmt != "jpg":
            buffer = io_mod.BytesIO()
            Image.open(io_mod.BytesIO(jpeg)).save(buffer, format={"webp": "WEBP", "png": "PNG"}[fmt])
            data = buffer.getvalue()
        key = f"{i:09d}"
        meta = {"url": f"http://127.0.0.1/{key}", "caption": caption, "key": key, "status": "success"}
        members += [(f"{key}.{fmt}", data), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
    fx.write_tar(path, members)


def test_img2dataset_and_pool_shards_train(tmp_path, tiny_model):
    """Shards as img2dataset writes them, and pool shards from the project's own ShardWriter, both train."""
    from core.shard_writer import ShardWriter

    folder = tmp_path / "img2dataset"
    folder.mkdir()
    _img2dataset_shard(str(folder / "00000.tar"), 0, 6, formats=("jpg", "webp", "png"))
    _img2dataset_shard(str(folder / "00001.tar"), 6, 6)
    for n in (0, 1):
        (folder / f"0000{n}.parquet").write_bytes(b"PAR1 not read by the trainer")
        (folder / f"0000{n}_stats.json").write_text(json.dumps({"count": 6, "successes": 6}))
    _img2dataset_shard(str(folder / "00002.tar"), 12, 6)  # no _stats.json: uncommitted, left out
    shards = data_mod.list_shards(str(folder))
    assert [os.path.basename(s.path) for s in shards] == ["00000.tar", "00001.tar"]
    keys = [k for b in _stream(shards, batch_size=4) for k in b.keys]
    assert sorted(keys) == [f"{i:09d}" for i in range(12)]  # webp and png decode too

    pool = tmp_path / "pool"
    writer = ShardWriter(str(pool), 0, "jpg", [])
    for row in range(8):
        jpeg, caption, _ = fx.train_sample(12, row, 0.0)
        key = f"00000{row:04d}"
        failed = row == 3  # a failed download: a parquet row, no tar members
        writer.add({"key": key, "url": f"http://127.0.0.1/{row}", "caption": caption,
                    "status": "failed_to_download" if failed else "success"}, None if failed else jpeg)  # fmt: skip
    writer.commit({"count": 8, "successes": 7})

    for name, source in (("i2d", folder), ("pool", pool)):
        config = _run_config(tmp_path, str(source), None, tiny_model, name, "data.eval_tar=null",
                             "checkpoint.every_steps=0", "steps=2")  # fmt: skip
        train(config)
        assert len(_losses(config.run_dir)) == 2


def test_a_stream_without_readable_shards_fails_instead_of_spinning(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file" * 10)
    stream = _stream(data_mod.list_shards(str(tmp_path)), repeat=True)
    with pytest.raises(RuntimeError, match="read no samples in epoch 0"):
        next(iter(stream))


# -- resume: the stream picks up exactly where a run stopped -----------------------------


def _consume(stream: data_mod.ShardStream, workers: int, n: int):
    """The first ``n`` batches from a DataLoader over ``stream``, and where each logical worker stood."""
    loader = data_mod.make_loader(stream, workers)
    taken, positions = [], {}
    for batch in loader:
        taken.append(batch.keys)
        positions[batch.worker] = batch.position
        if len(taken) == n:
            break
    return taken, positions


@pytest.mark.parametrize("resampled", [False, True])
def test_stream_resumes_at_the_same_batch(shards_dir, resampled):
    """Stop after k batches (k odd, so worker turns are offset), restart from the positions: same batches."""
    shards = data_mod.list_shards(shards_dir)
    kwargs = dict(batch_size=3, repeat=True, shuffle_buffer=5, resampled=resampled, rank=1, world_size=2)
    whole, _ = _consume(_stream(shards, **kwargs), workers=2, n=12)  # ~3 epochs of this rank's share
    first, positions = _consume(_stream(shards, **kwargs), workers=2, n=5)
    resumed = _stream(
        shards, **kwargs, start_positions=tuple(positions[w] for w in range(2)), worker_offset=5 % 2
    )
    rest, _ = _consume(resumed, workers=2, n=7)
    assert first + rest == whole


def test_resampled_stream_is_seeded_and_draws_with_replacement(tmp_path):
    fx.write_train_shards(str(tmp_path), samples=24, per_shard=4, seed=5, noise=0.0)
    shards = data_mod.list_shards(str(tmp_path))
    draws = [data_mod.resampled_shards(shards, seed=0, epoch=e, reader=0, readers=2) for e in range(6)]
    assert draws == [data_mod.resampled_shards(shards, seed=0, epoch=e, reader=0, readers=2) for e in range(6)]
    assert all(len(d) == 3 for d in draws)  # ceil(6 shards / 2 readers) per epoch
    assert draws[0] != data_mod.resampled_shards(shards, seed=0, epoch=0, reader=1, readers=2)
    assert any(len(set(d)) < len(d) for d in draws)  # with replacement: some epoch repeats a shard
    stream = _stream(shards, resampled=True, repeat=True, batch_size=8)
    batches = [b for _, b in zip(range(10), stream)]  # 80 samples from 24: an endless stream
    assert all(len(b.keys) == 8 for b in batches)


def _params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_params(a: str, b: str) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-5, atol=1e-6, msg=key)


KILL_AT_CHECKPOINT = """
import os, signal, sys
from train import checkpoint
from train.__main__ import main

real_save = checkpoint.save_checkpoint

def save_then_die(folder, model, progress, *args, **kwargs):
    path = real_save(folder, model, progress, *args, **kwargs)
    if progress.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no clean exit: no finally, no flush, no atexit
    return path

checkpoint.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _flags(config_args: list[str]) -> list[str]:
    return [arg for pair in config_args for arg in ("--set", pair)]


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_parameters(tmp_path, shards_dir, tiny_model):
    """SIGKILL after the step-3 checkpoint, rerun with --resume latest: step 6 equals an uninterrupted run.

    Two data workers and an odd step count exercise worker turn-taking; the 6 steps cross an
    epoch boundary of one worker's share.
    """
    common = [
        f"data.train_shards={shards_dir}", "data.eval_tar=null", "data.workers=2", "data.shuffle_buffer=6",
        f"model.config_file={tiny_model}", "model.name=webclip-test-tiny", "batch_size=4", "steps=6",
        "log_every=1", "optim.warmup_steps=2", "checkpoint.every_steps=3", "threads=1", "tensorboard=false",
    ]  # fmt: skip
    whole = load_config(None, [*common, f"run_dir={tmp_path / 'whole'}"])
    train(whole)

    run_dir = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_STEP": "3", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "killed.out", "w") as out:  # files, not pipes: orphaned workers may hold them
        done = subprocess.run(
            [sys.executable, "-c", KILL_AT_CHECKPOINT, *_flags([*common, f"run_dir={run_dir}"]), "--resume", "latest"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 3
    assert not (checkpoints / "step_00000006.pt").exists()

    resumed = load_config(None, [*common, f"run_dir={run_dir}", "resume=latest"])
    train(resumed)
    _assert_same_params(str(checkpoints / "step_00000006.pt"), os.path.join(whole.checkpoint_dir, "step_00000006.pt"))
    assert _losses(run_dir) == _losses(whole.run_dir)  # steps 1-3 before the kill, 4-6 after it
    state = torch.load(checkpoints / "step_00000006.state.pt", weights_only=True)
    assert state["progress"] == {"step": 6, "samples_seen": 24, "epoch": 1}
    assert state["ranks"][0]["batches_taken"] == 6 and set(state["ranks"][0]["positions"]) == {0, 1}


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, shards_dir, tiny_model):
    config = _run_config(tmp_path, shards_dir, None, tiny_model, "fresh", "data.eval_tar=null", "resume=latest",
                         "steps=2", "checkpoint.every_steps=0")  # fmt: skip
    train(config)
    assert json.load(open(os.path.join(config.checkpoint_dir, "latest.json")))["step"] == 2
    again = _run_config(tmp_path, shards_dir, None, tiny_model, "fresh", "data.eval_tar=null", "resume=latest",
                        "steps=2", "checkpoint.every_steps=0")  # fmt: skip
    train(again)  # a finished run resumed: nothing to train, nothing rewritten
    assert len(_losses(config.run_dir)) == 2


# -- the step: accumulation, checkpointing, FLOPs -----------------------------------------------


def test_accumulation_averages_micro_batch_losses(tmp_path, shards_dir, tiny_model):
    """accum_steps=2: one optimizer step on the mean of two 4-sample contrastive losses, by hand."""
    from train import model as model_mod

    config = _run_config(tmp_path, shards_dir, None, tiny_model, "accum", "data.eval_tar=null", "steps=1",
                         "accum_steps=2", "checkpoint.every_steps=0", "model.channels_last=false")  # fmt: skip
    train(config)

    torch.manual_seed(config.seed)
    model = model_mod.create_model("webclip-test-tiny")
    fast.speed_up(model)  # as the trainer does: its first Adam step turns a rounding difference into ~lr
    mean, std = model_mod.normaliser(model, torch.device("cpu"))
    stream = _stream(data_mod.list_shards(shards_dir), batch_size=4, shuffle_buffer=8, repeat=True)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=cosine_lr(
        0, base_lr=config.optim.lr, warmup_steps=2, total_steps=1), betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    losses = []
    for batch, _ in zip(stream, range(2)):
        features = model(model_mod.normalise(batch.images, mean, std), batch.texts)
        losses.append(clip_loss(*features[:3]))
    (sum(losses) / 2).backward()
    optimizer.step()
    saved = _params(os.path.join(config.checkpoint_dir, "step_00000001.pt"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert _losses(config.run_dir)[0] == pytest.approx(float(sum(losses).detach() / 2), rel=1e-4)


def test_grad_checkpointing_trains_the_same(tmp_path, shards_dir, tiny_model):
    plain = _run_config(tmp_path, shards_dir, None, tiny_model, "plain", "data.eval_tar=null", "steps=2")
    checkpointed = _run_config(tmp_path, shards_dir, None, tiny_model, "gc", "data.eval_tar=null", "steps=2",
                               "model.grad_checkpointing=true")  # fmt: skip
    for config in (plain, checkpointed):
        train(config)
    assert _losses(plain.run_dir) == pytest.approx(_losses(checkpointed.run_dir), rel=1e-5)


def test_flops_count_and_speed_record(tiny_model):
    from train import model as model_mod

    torch.manual_seed(0)
    model = model_mod.create_model("webclip-test-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = throughput.train_flops_per_sample(model, 32, torch.device("cpu"))
    assert flops is not None and flops > 3 * 2 * 32 * 32 * 32  # at least the patch embedding's matmul
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    record = throughput.speed_record(200, 2.0, world_size=2, flops_per_sample=1e9, peak=1e11)
    assert record == {"samples_per_s": 100.0, "samples_per_s_per_device": 50.0, "tflops_per_s": 0.1, "mfu": 0.5}
    assert throughput.speed_record(10, 1.0, 1, 1e9, None)["mfu"] is None  # CPU: no peak, no MFU
    assert throughput.peak_flops(torch.device("cpu"), None) is None
    assert throughput.peak_flops(torch.device("cpu"), 2.0) == 2e12


# -- evaluation: classes from files, retrieval ----------------------------------------------------


def test_recall_at_k():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    figures = evaluate.recall_at_k(images, texts, ks=(1, 2), chunk=3)
    assert figures == {"image_to_text_R@1": 0.5, "image_to_text_R@2": 1.0,  # the swapped pair is 2nd
                       "text_to_image_R@1": 0.5, "text_to_image_R@2": 1.0}  # fmt: skip
    near = torch.nn.functional.normalize(torch.eye(4) + 0.3 * torch.eye(4)[[1, 0, 3, 2]], dim=1)
    assert evaluate.recall_at_k(near, near, ks=(1,))["image_to_text_R@1"] == 1.0


def test_eval_with_class_and_template_files_and_retrieval(tmp_path, shards_dir, tiny_model, capsys):
    classes = [scenes.CLASSES[i] for i in (0, 7, 14)]
    (tmp_path / "classes.txt").write_text("".join(f"{c} {s}\n" for c, s in classes))
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {}\n")
    members = []
    for i, (jpeg, _, meta) in enumerate(fx.eval_samples(per_class=2)):
        pair = (meta["colour"], meta["shape"])
        if pair in classes:
            members += [(f"{i:06d}.jpg", jpeg), (f"{i:06d}.cls", str(classes.index(pair)).encode())]
    members += [("999998.jpg", members[0][1])]  # no label
    members += [("999999.jpg", members[0][1]), ("999999.cls", b"7")]  # a label outside the 3 classes
    fx.write_tar(str(tmp_path / "eval.tar"), members)

    config = _run_config(
        tmp_path, shards_dir, str(tmp_path / "eval.tar"), tiny_model, "files", "steps=2", "eval_every=1",
        f"data.eval_classnames={tmp_path / 'classes.txt'}", f"data.eval_templates={tmp_path / 'templates.txt'}",
        f"data.eval_shards={shards_dir}", "data.eval_max_samples=20", "checkpoint.every_steps=0",
    )  # fmt: skip
    result = train(config)
    out = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"^zero-shot top1=\d\.\d\d top5=1\.00 \(3 classes\)$", out[-1]) and out[-1] == result.line()
    assert out[-3].startswith("retrieval R@1/5/10: image->text ")
    figures = json.load(open(os.path.join(config.run_dir, "zeroshot.json")))
    assert figures["n"] == 6 and figures["eval_skipped"] == {"label_missing": 2}
    assert figures["retrieval"]["n"] == 20 and 0 <= figures["retrieval"]["text_to_image_R@10"] <= 1
    evals = [r for r in map(json.loads, open(os.path.join(config.run_dir, "log.jsonl"))) if "retrieval" in r]
    assert [r["step"] for r in evals] == [1, 2]  # periodic (step 1) and final (step 2)
    assert "top1" in evals[0]["zeroshot"] and "image_to_text_R@5" in evals[0]["retrieval"]


def test_zeroshot_reads_clip_benchmarks_layout(tmp_path, shards_dir, tiny_model):
    """{root}/classnames.txt and templates ({c}) beside {root}/{split}/{n}.tar with .cls labels; a folder of tars."""
    root = tmp_path / "bench"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("red circle\nblue square\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}\n")
    images = [jpeg for jpeg, _, _ in fx.eval_samples(per_class=1)][:4]
    fx.write_tar(str(root / "test" / "0.tar"), [("0.jpg", images[0]), ("0.cls", b"0"), ("1.jpg", images[1]),
                                                  ("1.cls", b"1")])  # fmt: skip
    fx.write_tar(str(root / "test" / "1.tar"), [("2.jpg", images[2]), ("2.cls", b"1"), ("3.jpg", images[3])])
    classes = zeroshot.find_classes(str(root / "test" / "0.tar"))
    assert classes.prompts() == [["a photo of a red circle.", "a red circle"], ["a photo of a blue square.",
                                                                                "a blue square"]]  # fmt: skip
    eval_set = zeroshot.load_eval_set(str(root / "test"), 32, len(classes.names))  # the split's folder: both tars
    assert eval_set.keys == ["0", "1", "2"] and eval_set.labels.tolist() == [0, 1, 1]
    assert eval_set.skipped == {"label_missing": 1}
    result = zeroshot.topk_metrics(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), eval_set.labels)
    assert (result.top1, result.top5, result.per_class_top1) == (pytest.approx(2 / 3), 1.0, [1.0, 0.5])
    assert result.mean_per_class_recall == 0.75

    lone = tmp_path / "lone"
    lone.mkdir()
    fx.write_tar(str(lone / "eval.tar"), [("0.jpg", images[0]), ("0.cls", b"0")])
    config = _run_config(tmp_path, shards_dir, str(lone / "eval.tar"), tiny_model, "no-classes")
    with pytest.raises(ConfigError, match="no class names; give data.eval_classnames"):
        train(config)
