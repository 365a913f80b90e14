"""Object-storage faults (issue 21): a fault-injecting proxy of our own (``_faulty_s3``) on loopback in
front of the real S3 server answers a seeded 5% of requests with 503 SlowDown, 500, a reset mid-body or a
stall past the client's timeout. Reads, writes and training checkpoints come out byte-identical; past the
retry budget the command names the object, and rerunning it completes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import fsspec
import pytest
import torch

from _faulty_s3 import FAULTS, FaultyProxy
from core import storage
from train.config import load_config
from train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


@pytest.fixture
def through(s3_env, monkeypatch):
    """Run the block's object-storage traffic through a faulty proxy: yields a function (rate, seed, **kw) -> proxy."""
    proxies = []

    def start(rate: float = 0.05, seed: int = 21, **kwargs) -> FaultyProxy:
        proxy = FaultyProxy(s3_env["S3_ENDPOINT_URL"], rate=rate, seed=seed, stall_s=1.3, **kwargs)
        context = proxy.serve()
        endpoint = context.__enter__()
        proxies.append(context)
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("WEBCLIP_S3_TIMEOUT_S", "1")
        return proxy

    yield start
    for context in proxies:
        context.__exit__(None, None, None)
    fsspec.AbstractFileSystem.clear_instance_cache()


def test_reads_writes_and_listings_survive_every_fault_byte_identical(s3_env, through):
    rng = random.Random(5)
    blobs = {f"obj{i:03d}.bin": rng.randbytes(rng.randrange(1000, 60000)) for i in range(60)}
    folder = f"s3://webclip/faults/io-{time.time_ns()}"
    before = storage.retry_counts()["storage_retries"]
    proxy = through(rate=0.05, seed=3)
    start = time.monotonic()
    for name, data in blobs.items():
        with storage.atomic_write(storage.join(folder, name)) as handle:
            handle.write(data)
    names = [p.rsplit("/", 1)[-1] for p in storage.list_files(folder)]
    back = {}
    for name in names:
        with storage.open_file(storage.join(folder, name)) as handle:
            back[name] = handle.read()
        back[name + "?"] = storage.fingerprint(storage.join(folder, name))["bytes"]
    took = time.monotonic() - start
    print(f"\nfaults {dict(proxy.counts)} in {proxy.requests} requests; {took:.1f} s; "
          f"retries counted {storage.retry_counts()['storage_retries'] - before}")
    assert sorted(names) == sorted(blobs)
    for name, data in blobs.items():
        assert back[name] == data, name
        assert back[name + "?"] == len(data)
    assert set(proxy.counts) == set(FAULTS), proxy.counts  # every kind was injected and survived
    # every fault that needed a retry is counted (a reset after a complete answer needs none; s3fs re-reads a
    # body cut mid-read itself, uncounted), and no more than were injected
    needed = sum(1 for fault, _, _ in proxy.injected if fault != "reset")
    assert needed <= storage.retry_counts()["storage_retries"] - before <= len(proxy.injected)


# -- training checkpoints and resume ---------------------------------------------------------------


def _args(shards_dir, tiny_model, run_dir, checkpoints, *extra) -> list[str]:
    return [f"data.train_shards={shards_dir}", "data.eval_tar=null", "data.workers=0", "data.shuffle_buffer=8",
            f"model.config_file={tiny_model}", "model.name=webclip-test-tiny", "batch_size=8", "steps=6",
            "log_every=1", "optim.warmup_steps=2", "checkpoint.every_steps=3", "threads=1", "tensorboard=false",
            f"run_dir={run_dir}", f"checkpoint.dir={checkpoints}", *extra]  # fmt: skip


def _bytes(path: str) -> bytes:
    with storage.open_file(path) as handle:
        return handle.read()


def test_checkpoints_and_resume_through_faults_are_byte_identical(s3_env, through, tmp_path, shards_dir, tiny_model):
    clean = f"s3://webclip/faults/ck-clean-{time.time_ns()}"
    train(load_config(None, _args(shards_dir, tiny_model, tmp_path / "clean", clean)))
    expected = {n: _bytes(storage.join(clean, n)) for n in ("step_00000003.pt", "step_00000006.pt")}

    proxy = through(rate=0.05, seed=42)
    faulty = f"s3://webclip/faults/ck-faulty-{time.time_ns()}"
    train(load_config(None, _args(shards_dir, tiny_model, tmp_path / "faulty", faulty)))
    # and a resume from step 3, through the faults too: it rewrites step 6
    train(load_config(None, _args(shards_dir, tiny_model, tmp_path / "resumed", faulty,
                                  f"resume={storage.join(faulty, 'step_00000003.pt')}")))  # fmt: skip
    print(f"\nfaults {dict(proxy.counts)} in {proxy.requests} requests")
    assert sum(proxy.counts.values()) >= 1
    for name, data in expected.items():
        assert _bytes(storage.join(faulty, name)) == data, name
    summary = json.load(open(tmp_path / "resumed" / "zeroshot.json"))["train"]
    assert summary["resumed_from_step"] == 3
    assert "storage_retries" in summary and "storage_retried_objects" in summary


def test_past_the_retry_budget_the_command_names_the_object_and_a_rerun_completes(s3_env, through, tmp_path,
                                                                                  shards_dir, tiny_model):  # fmt: skip
    checkpoints = f"s3://webclip/faults/ck-budget-{time.time_ns()}"
    proxy = through(rate=1.0, seed=1, faults=("slowdown",), only="step_00000003.pt")
    args = _args(shards_dir, tiny_model, tmp_path / "run", checkpoints)
    flags = [a for p in args for a in ("--set", p)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WEBCLIP_S3_RETRIES": "2"}
    env.pop("WEBCLIP_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "train", *flags, "--resume", "latest"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and f"{checkpoints}/step_00000003.pt".removeprefix("s3://") in error[0], done.stderr
    assert "gave up on s3://" in error[0] and "rerun the same command" in error[0], error
    assert proxy.counts["slowdown"] >= 2
    proxy.armed = False  # the store recovers
    done = subprocess.run([sys.executable, "-m", "train", *flags, "--resume", "latest"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_json(storage.join(checkpoints, "latest.json"))["step"] == 6
