"""Two processes under torchrun (gloo) must train like one process on the combined batch.

The pytest tests launch ``torchrun --nproc_per_node 2`` on this very file; its
``__main__`` block is the worker: each rank takes its half of a fixed batch, computes
the local loss with gathered features, and DDP-style averaged gradients; rank 0 writes
both to a JSON file that the test compares with a single-process computation.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import _train_fixtures as fx
from train.loss import clip_loss, siglip_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, DIM_IN, DIM_OUT = 8, 6, 4


def _problem():
    """A fixed batch and two tiny 'towers' (one linear map each)."""
    generator = torch.Generator().manual_seed(0)
    x_image = torch.randn(GLOBAL_BATCH, DIM_IN, generator=generator)
    x_text = torch.randn(GLOBAL_BATCH, DIM_IN, generator=generator)
    w_image = torch.randn(DIM_IN, DIM_OUT, generator=generator)
    w_text = torch.randn(DIM_IN, DIM_OUT, generator=generator)
    return x_image, x_text, w_image, w_text


def _loss_and_grads(rows: slice, rank: int, world_size: int, loss_name: str = "clip"):
    """The loss and the gradients of both towers and (SigLIP) of the logit bias."""
    x_image, x_text, w_image, w_text = _problem()
    w_image.requires_grad_(True)
    w_text.requires_grad_(True)
    bias = torch.tensor(-2.0, requires_grad=True)
    images = F.normalize(x_image[rows] @ w_image, dim=-1)
    texts = F.normalize(x_text[rows] @ w_text, dim=-1)
    if loss_name == "siglip":
        loss = siglip_loss(images, texts, torch.tensor(10.0), bias, rank, world_size)
    else:
        loss = clip_loss(images, texts, torch.tensor(10.0), rank, world_size)
    loss.backward()
    return loss, w_image.grad, w_text.grad, torch.zeros(()) if bias.grad is None else bias.grad


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(__file__)])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.integration
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_two_rank_loss_and_gradients_equal_one_process(tmp_path, loss_name):
    """CLIP gathers features; SigLIP passes caption chunks around the ring: both equal one process."""
    out = tmp_path / "dist.json"
    _torchrun(__file__, str(out), loss_name)
    got = json.loads(out.read_text())
    loss, grad_image, grad_text, grad_bias = _loss_and_grads(slice(None), 0, 1, loss_name)
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(torch.tensor(got["grad_image"]), grad_image, atol=1e-6)
    assert torch.allclose(torch.tensor(got["grad_text"]), grad_text, atol=1e-6)
    assert got["grad_bias"] == pytest.approx(grad_bias.item(), rel=1e-5, abs=1e-7)


@pytest.mark.integration
def test_torchrun_training_evaluates_checkpoints_and_resumes(tmp_path):
    """2 ranks: periodic and final eval (zero-shot + retrieval on every rank), then an exact 2-rank resume.

    The eval at step 2 and at the end runs on both ranks with gathered results: the job
    must end (no rank left at a barrier) with the figures in the log. Resuming the step-2
    checkpoint in a second torchrun job must reproduce the first job's step-4 weights.
    """
    shards = tmp_path / "shards"
    fx.write_train_shards(str(shards), samples=16, per_shard=4, seed=2, noise=0.0)
    held_out = tmp_path / "held_out"
    fx.write_train_shards(str(held_out), samples=10, per_shard=5, seed=9, noise=0.0)
    eval_tar = tmp_path / "eval.tar"
    fx.write_eval_tar(str(eval_tar), per_class=1)
    model_config = fx.write_tiny_model_config(str(tmp_path))
    common = [
        "--set", f"data.train_shards={shards}", "--set", f"model.config_file={model_config}",
        "--set", "model.name=webclip-test-tiny", "--set", "batch_size=8", "--set", "steps=4",
        "--set", "log_every=1", "--set", "data.workers=0", "--set", "data.shuffle_buffer=4",
        "--set", "optim.warmup_steps=1", "--set", "checkpoint.every_steps=2", "--set", "tensorboard=false",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    done = _torchrun(
        "-m", "train", *common, "--set", f"run_dir={run_dir}", "--set", f"data.eval_tar={eval_tar}",
        "--set", f"data.eval_shards={held_out}", "--set", "eval_every=2",
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1]
    assert re.match(r"^zero-shot top1=\S+ top5=\S+ \(48 classes\)$", last)
    summary = json.loads((run_dir / "zeroshot.json").read_text())
    assert summary["train"]["world_size"] == 2 and summary["train"]["samples_seen"] == 32
    assert summary["n"] == 48  # every eval image scored once, over both ranks
    assert summary["retrieval"]["n"] == 10  # both ranks' held-out samples gathered
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "retrieval" in r] == [2, 4]
    assert (run_dir / "checkpoints" / "step_00000004.pt").exists()

    resumed_dir = tmp_path / "resumed"
    _torchrun(
        "-m", "train", *common, "--set", f"run_dir={resumed_dir}", "--set", "data.eval_tar=null",
        "--resume", str(run_dir / "checkpoints" / "step_00000002.pt"),
    )  # fmt: skip
    original = torch.load(run_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["state_dict"]
    resumed = torch.load(resumed_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["state_dict"]
    for key, value in original.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    state = torch.load(resumed_dir / "checkpoints" / "step_00000004.state.pt", weights_only=True)
    assert [sorted(r["positions"]) for r in state["ranks"]] == [[0], [0]]  # each rank saved its own reader


def _worker(out_path: str, loss_name: str) -> None:
    from train import distributed

    world = distributed.init("cpu")
    try:
        half = GLOBAL_BATCH // world.world_size
        rows = slice(world.rank * half, (world.rank + 1) * half)
        loss, grad_image, grad_text, grad_bias = _loss_and_grads(rows, world.rank, world.world_size, loss_name)
        loss = loss.detach()
        # What DDP does with the gradients, and what the loop logs as the loss: the mean over ranks.
        for tensor in (loss, grad_image, grad_text, grad_bias):
            torch.distributed.all_reduce(tensor)
            tensor /= world.world_size
        if world.is_main:
            with open(out_path, "w") as handle:
                json.dump({"loss": loss.item(), "grad_image": grad_image.tolist(), "grad_text": grad_text.tolist(),
                           "grad_bias": grad_bias.item()}, handle)  # fmt: skip
        distributed.barrier(world)  # leave together: gloo may abort a rank whose peer tears down first
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
