"""Faults in training (issue 21): poisoned batches, SIGTERM. Real inputs, real subprocesses, real signals.

A poisoned batch is made honestly: the model starts from weights (``model.pretrained``)
whose embedding of one word is huge but finite (3e38), so a caption holding that word
overflows the text tower's LayerNorm to NaN, and captions without it train normally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _commands import small_filesystem
from train import checkpoint as ckpt
from train import model as model_mod
from train.config import load_config
from train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POISONED_KEY = "000020003"  # 'my favourite purple cross!': the only caption with 'favourite'


def _poisoned_weights(folder, word: str | None) -> str:
    """Random-init weights of the tiny model with one token's embedding at 3e38 (finite); a step_*.pt file."""
    torch.manual_seed(0)
    model = model_mod.create_model("webclip-test-tiny", image_size=None, device="cpu")
    tokenizer = model_mod.tokenizer_for("webclip-test-tiny")
    token = tokenizer([word])[0][1].item() if word else tokenizer([""])[0][0].item()  # start-of-text: every caption
    with torch.no_grad():
        model.token_embedding.weight[token] = 3e38
    path = os.path.join(str(folder), f"poisoned_{word or 'sot'}.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _common(shards_dir, tiny_model, run_dir, *extra: str) -> list[str]:
    return [f"data.train_shards={shards_dir}", "data.eval_tar=null", "data.workers=0", "data.shuffle_buffer=8",
            f"model.config_file={tiny_model}", "model.name=webclip-test-tiny", "batch_size=8", "log_every=1",
            "optim.warmup_steps=2", "threads=1", "tensorboard=false", f"run_dir={run_dir}", *extra]  # fmt: skip


def _records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _all_finite(path: str) -> bool:
    weights = torch.load(path, weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


def test_a_poisoned_batch_is_skipped_and_logged_and_training_goes_on(tmp_path, shards_dir, tiny_model):
    weights = _poisoned_weights(tmp_path, "favourite")
    run_dir = tmp_path / "run"
    config = load_config(None, _common(shards_dir, tiny_model, run_dir, "steps=6", "checkpoint.every_steps=2",
                                       f"model.pretrained={weights}"))  # fmt: skip
    train(config)
    records = _records(run_dir)
    skipped = [r for r in records if r.get("nonfinite")]
    assert 1 <= len(skipped) <= 2, records  # the sample comes once per epoch of 3 steps
    assert all(any(key.endswith(POISONED_KEY) for key in r["keys"]) and len(r["keys"]) == 8 for r in skipped)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    good_steps = {r["step"] for r in records if "loss" in r} - {r["step"] for r in skipped}
    assert all(r["loss"] == r["loss"] for r in records if r.get("step") in good_steps and "loss" in r)  # not NaN
    summary = json.load(open(run_dir / "zeroshot.json"))["train"]
    assert summary["nonfinite_steps_skipped"] == len(skipped) and summary["steps"] == 6
    for name in ("step_00000002.pt", "step_00000004.pt", "step_00000006.pt"):
        assert _all_finite(os.path.join(config.checkpoint_dir, name))


def test_non_finite_steps_in_a_row_stop_the_run_with_exit_1(tmp_path, shards_dir, tiny_model):
    weights = _poisoned_weights(tmp_path, None)  # every caption starts with the poisoned token
    run_dir = tmp_path / "run"
    args = _common(shards_dir, tiny_model, run_dir, "steps=6", "checkpoint.every_steps=0",
                   f"model.pretrained={weights}", "optim.max_nonfinite_steps=3")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "train", *[a for p in args for a in ("--set", p)]], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in done.stderr
    assert done.stderr.count("non-finite loss or gradient (loss nan)") == 3, done.stderr[-3000:]
    assert not os.path.exists(run_dir / "checkpoints" / "latest.json")  # the run saved nothing


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, tiny_model):
    model = model_mod.create_model("webclip-test-tiny", image_size=None, device="cpu")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    progress = ckpt.TrainProgress(step=1, samples_seen=8, epoch=0)
    with pytest.raises(ckpt.NonFiniteWeights, match="logit_scale"):
        ckpt.save_checkpoint(str(tmp_path / "ck"), model, progress, "webclip-test-tiny", 64, {})
    assert not os.path.exists(tmp_path / "ck") or not os.listdir(tmp_path / "ck")


def _params(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.integration
def test_sigterm_saves_the_checkpoint_due_soon_and_the_run_resumes_exactly(tmp_path, shards_dir, tiny_model):
    """A real SIGTERM to a real training process at step ~1: it trains on to the checkpoint due at step 6,
    saves it, exits 130; --resume latest then ends at step 12 with the uninterrupted run's weights."""
    common = ["steps=12", "checkpoint.every_steps=6", "checkpoint.sigterm_within_steps=6"]
    whole = load_config(None, _common(shards_dir, tiny_model, tmp_path / "whole", *common))
    train(whole)

    run_dir = tmp_path / "term"
    args = [a for p in _common(shards_dir, tiny_model, run_dir, *common) for a in ("--set", p)]
    with open(tmp_path / "term.out", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ROOT,
                                                                  "OMP_NUM_THREADS": "1"})  # fmt: skip
        log_path = run_dir / "log.jsonl"
        deadline = time.monotonic() + 120
        while not (log_path.exists() and log_path.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    output = (tmp_path / "term.out").read_text()
    assert code == 130, output[-3000:]
    assert "SIGTERM at step" in output and "interrupted" in output and "Resume with:" in output, output[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 6, output[-3000:]
    assert not (checkpoints / "step_00000012.pt").exists()

    resumed = load_config(None, _common(shards_dir, tiny_model, run_dir, *common, "resume=latest"))
    train(resumed)
    a, b = _params(checkpoints / "step_00000012.pt"), _params(os.path.join(whole.checkpoint_dir, "step_00000012.pt"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.integration
def test_a_full_disk_stops_with_the_path_and_the_space_and_a_rerun_completes(tmp_path, shards_dir, tiny_model):
    steps = ["steps=4", "checkpoint.every_steps=2"]
    whole = load_config(None, _common(shards_dir, tiny_model, tmp_path / "whole", *steps))
    train(whole)
    model_bytes = os.path.getsize(os.path.join(whole.checkpoint_dir, "step_00000002.pt"))
    state_bytes = os.path.getsize(os.path.join(whole.checkpoint_dir, "step_00000002.state.pt"))

    disk = tmp_path / "disk"
    with small_filesystem(disk, 4 * (model_bytes + state_bytes) + (1 << 20)) as mounted:
        checkpoints = disk / "ck"
        args = [a for p in _common(shards_dir, tiny_model, tmp_path / "run", *steps, f"checkpoint.dir={checkpoints}")
                for a in ("--set", p)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        env.pop("WEBCLIP_DEBUG", None)
        limit = None
        if mounted:  # fill it up, leaving half a checkpoint's room
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(disk / "filler", "wb") as handle:
                handle.write(b"\0" * (free - model_bytes // 2))
        else:
            limit = model_bytes // 2

        def small():
            if limit is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        done = subprocess.run([sys.executable, "-m", "train", *args, "--resume", "latest"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180, preexec_fn=small)  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        error = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(error) == 1, done.stderr[-3000:]
        assert f"{checkpoints}/step_00000002.pt: " in error[0], error
        assert f"needs {model_bytes:,} bytes" in error[0] and "bytes free in" in error[0], error
        assert "no space left on the device" in error[0] or "file-size limit" in error[0], error
        assert not checkpoints.exists() or os.listdir(checkpoints) == []  # nothing half-written, no lock left

        if mounted:
            os.remove(disk / "filler")  # space freed
        limit = None
        done = subprocess.run([sys.executable, "-m", "train", *args, "--resume", "latest"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        for name in ("step_00000002.pt", "step_00000004.pt"):
            assert (checkpoints / name).read_bytes() == open(os.path.join(whole.checkpoint_dir, name), "rb").read()
    print(f"\nfull disk: {'tmpfs' if mounted else 'RLIMIT_FSIZE'}; checkpoint {model_bytes:,} + {state_bytes:,} bytes")
