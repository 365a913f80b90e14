"""The trainer: config checks, the loss, the streaming input, a short run, zero-shot eval."""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
from collections import Counter

import open_clip
import pytest
import torch
import torch.nn.functional as F

from infra.local import scenes
import _train_fixtures as fx
from train import data as data_mod
from train import zeroshot
from train.config import ConfigError, load_config
from train.loop import cosine_lr, train
from train.loss import clip_loss

LINE = re.compile(
    r"^zero-shot top1: seen=(\d\.\d\d|n/a) unseen=(\d\.\d\d|n/a) unseen_only=(\d\.\d\d|n/a) "
    r"chance=0\.021 \(48 classes\)$"
)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    """3 shards x 8 good samples, with a manifest."""
    folder = str(tmp_path_factory.mktemp("shards"))
    fx.write_train_shards(folder, samples=24, per_shard=8, seed=3, noise=0.0)
    return folder


@pytest.fixture(scope="module")
def eval_tar(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("eval") / "eval.tar")
    fx.write_eval_tar(path, per_class=1)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return fx.write_tiny_model_config(str(tmp_path_factory.mktemp("model")))


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


def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 1e-3\nsteps: 5\ndata:\n  eval_tar: null\n")
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


# -- zero-shot -------------------------------------------------------------------------


def test_zeroshot_metrics_and_line():
    labels = torch.arange(48)
    seen = torch.tensor([pair not in scenes.HELD_OUT_PAIRS for pair in scenes.CLASSES])
    scores = torch.zeros(48, 48)
    scores[labels, labels] = 1.0  # every image right ...
    red_star = scenes.CLASSES.index(("red", "star"))
    red_circle = scenes.CLASSES.index(("red", "circle"))
    scores[red_star, red_circle] = 2.0  # ... but the red star, called a red circle
    result = zeroshot.metrics(scores, labels, seen)
    assert result.seen == 1.0 and result.n_seen == 42 and result.n_unseen == 6
    assert result.unseen == pytest.approx(5 / 6)
    assert result.unseen_only == 1.0  # among the held-out classes only, red star still wins
    assert result.unseen_colour == 1.0 and result.unseen_shape == pytest.approx(5 / 6)
    assert LINE.match(result.line())
    assert result.line() == "zero-shot top1: seen=1.00 unseen=0.83 unseen_only=1.00 chance=0.021 (48 classes)"


def test_eval_set_labels_follow_scenes_classes(eval_tar):
    eval_set = zeroshot.load_eval_set(eval_tar, 32)
    assert eval_set.labels.tolist() == list(range(48))
    assert int((~eval_set.seen).sum()) == 6


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
        return [json.loads(line)["loss"] for line in handle]


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
    assert figures["seen"] == round(result.seen, 4) and figures["train"]["steps"] == 4
    assert len(_losses(config.run_dir)) == 4

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
    with pytest.raises(ConfigError, match="no manifest.json and no"):
        train(config)
    config = _run_config(tmp_path, shards_dir, str(tmp_path / "no.tar"), tiny_model, "f")
    with pytest.raises(ConfigError, match="data.eval_tar=.*no such file"):
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
    with open(eval_tar, "rb") as src, storage.atomic_write("s3://webclip/train-test/eval.tar") as dst:
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


def test_a_stream_without_readable_shards_fails_instead_of_spinning(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file" * 10)
    stream = _stream(data_mod.list_shards(str(tmp_path)), repeat=True)
    with pytest.raises(RuntimeError, match="read no samples in epoch 0"):
        next(iter(stream))
