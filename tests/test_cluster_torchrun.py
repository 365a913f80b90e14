"""Training on two "nodes" under torchrun, checkpoints on object storage, and a worker lost mid-run.

Two separate ``torchrun --nnodes 2 --nproc-per-node 1`` launchers, as on two machines,
meet through the c10d rendezvous on loopback (one of them hosts the store, as the first
node of a Slurm or Kubernetes job does) and train with gloo on the CPU. Shards and
checkpoints live on the S3-compatible server: nodes of a real cluster share no disk.

Once the first checkpoint is on S3, the test SIGKILLs one node's worker process (not
its launcher). torchrun (``--max-restarts``) then restarts the workers of both nodes in
a new rendezvous round, with the same command line, whose ``--resume latest`` finds the
newest checkpoint on S3. The job must finish (both launchers exit 0) at the final step,
having resumed from a checkpoint step, not from 0.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import _train_fixtures as fx
import pytest

from core import storage
from infra.ray.local_cluster import command_line, free_port, node_processes

STEPS, EVERY = 24, 4
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def upload_folder(local: Path, remote: str) -> None:
    for path in sorted(local.iterdir()):
        with storage.open_file(storage.join(remote, path.name), "wb") as handle:
            handle.write(path.read_bytes())


def launcher(node: int, endpoint: str, run_id: str, train_args: list[str], log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
        "--rdzv-conf", f"is_host={int(node == 0)}",  # both "nodes" share one host name: say which hosts the store
        "--local-addr", "127.0.0.1", "--max-restarts", "2", "--monitor-interval", "0.2",
        "-m", "train", *train_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO),
           # A store per rendezvous round: with the agents' shared store (torch's default), the restarted
           # workers read the dead round's gloo addresses and the job hangs (infra/README.md).
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def train_workers(process: subprocess.Popen) -> list[int]:
    """The launcher's worker processes (``python -m train``), not the launcher itself."""
    return [pid for pid in node_processes(process.pid)
            if pid != process.pid and " -m train " in f" {command_line(pid)} "]


def test_two_node_torchrun_resumes_from_s3_after_losing_a_worker(s3_env, tmp_path):
    base = "s3://webclip/cluster-train"
    fx.write_train_shards(str(tmp_path / "shards"), samples=64, per_shard=16, seed=3, noise=0.0)
    upload_folder(tmp_path / "shards", f"{base}/shards")
    checkpoints = f"{base}/checkpoints"
    train_args = [
        "--set", f"data.train_shards={base}/shards", "--set", f"checkpoint.dir={checkpoints}",
        "--set", f"checkpoint.every_steps={EVERY}", "--set", f"steps={STEPS}", "--set", "batch_size=8",
        "--set", f"model.config_file={fx.write_tiny_model_config(str(tmp_path))}",
        "--set", "model.name=webclip-test-tiny", "--set", "data.workers=0", "--set", "data.shuffle_buffer=4",
        "--set", "optim.warmup_steps=1", "--set", "log_every=1", "--set", "tensorboard=false",
        "--set", "data.eval_tar=null", "--set", f"run_dir={tmp_path / 'run'}",
        "--resume", "latest",  # a fresh start the first time; after a restart, the newest checkpoint on S3
    ]  # fmt: skip
    endpoint = f"127.0.0.1:{free_port('127.0.0.1')}"
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [launcher(n, endpoint, f"cluster-test-{os.getpid()}", train_args, logs[n]) for n in range(2)]
    seen_at_kill: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and all(p.poll() is None for p in nodes):
            if storage.exists(f"{checkpoints}/latest.json"):
                step = storage.read_json(f"{checkpoints}/latest.json")["step"]
                workers = train_workers(nodes[1])
                if workers:
                    os.kill(workers[0], signal.SIGKILL)  # that worker, by its id: not the launcher
                    seen_at_kill.append(step)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        for process in nodes:
            process.wait(timeout=150)
    finally:
        for process in nodes:
            if process.poll() is None:
                for pid in node_processes(process.pid):
                    os.kill(pid, signal.SIGKILL)
                process.wait(10)
    killer.join(5)
    output = "\n".join(f"--- node {n} ---\n" + logs[n].read_text(errors="replace") for n in range(2))
    assert seen_at_kill, f"no checkpoint appeared on S3 before the job ended:\n{output[-6000:]}"
    assert [p.returncode for p in nodes] == [0, 0], output[-6000:]
    assert seen_at_kill[0] < STEPS

    latest = storage.read_json(f"{checkpoints}/latest.json")
    assert latest["step"] == STEPS and storage.exists(f"{checkpoints}/step_{STEPS:08d}.pt")
    summary = json.loads((tmp_path / "run" / "zeroshot.json").read_text())["train"]
    resumed = summary["resumed_from_step"]
    assert resumed is not None and seen_at_kill[0] <= resumed < STEPS and resumed % EVERY == 0, summary
    assert summary["world_size"] == 2 and summary["samples_seen"] == STEPS * 8
    assert f"resume=latest: no checkpoint in {checkpoints} yet, starting at step 0" in output  # the first start
    assert f"resuming from {checkpoints}/step_{resumed:08d}.pt at step {resumed}" in output
    # The log (appended to on resume) has every step; where it steps back, it restarts right after the checkpoint.
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert set(steps) == set(range(1, STEPS + 1)) and steps[-1] == STEPS
    assert all(b == resumed + 1 for a, b in itertools.pairwise(steps) if b <= a), steps
