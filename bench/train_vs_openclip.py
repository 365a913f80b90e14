"""Our trainer against open_clip_train on the same shards, model, batch and precision.

    bash bench/peers.sh        # once: open_clip_train's venv in .bench/openclip
    make demo                  # once: the train shards in data/demo/train
    .venv/bin/python -m bench.train_vs_openclip [--steps 200] [--batch_size 256] \
        [--model webclip-tiny] [--precision fp32] [--repeat 2]

In one run, alternating who goes first:

1. **Training**: ``python -m train`` and ``python -m open_clip_train.main`` (through
   bench/openclip_main.py, which only registers our model configs) train the same
   model from scratch on the same shards with the same batch size, precision, learning
   rate schedule, optimizer betas, DataLoader workers and threads. Samples/s is taken
   from each tool's own step timing over the steps after the first log interval (the
   warm-up), and the whole command's wall time is recorded too. That open_clip_train
   trains at all from our shards is the interop check (no conversion step).
2. **Data loading alone**: bench/loader_rate.py in each venv, shards to normalised
   batches on the device with the same resize-and-centre-crop transform.

Both tools get ``OMP_WAIT_POLICY=PASSIVE`` (our trainer's default) so that neither
loses to spinning OpenMP threads on this small machine. Writes
bench/results/train_vs_openclip.json.

On a GPU (``--device cuda``; bench/train_gpu.py drives it there): ``--precision bf16``
is our ``bf16`` and open_clip's ``amp_bf16``, ``--compile`` is our ``compile=true``
and open_clip's ``--torchcompile``, and our MFU (the trainer's own, logged per
interval) is reported beside the rate.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.measure import run_measured, save_result, tail

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / ".venv/bin/python"
THEIRS = ROOT / ".bench/openclip/bin/python"
LOG_EVERY = 10


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/demo/train")
    p.add_argument("--model", default="webclip-tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--loader_batches", type=int, default=40)
    p.add_argument("--work", default="runs/bench/train")
    add_gpu_arguments(p)
    return p.parse_args()


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    """Options for running the comparison elsewhere (bench/train_gpu.py): device, compile, interpreters."""
    p.add_argument("--device", default="auto", help="ours: auto, cpu or cuda (open_clip_train picks cuda if present)")
    p.add_argument("--compile", action="store_true", help="torch.compile in both (ours: compile=true; theirs: --torchcompile)")
    p.add_argument("--ours_python", default=str(OURS), help="the interpreter that runs `-m train`")
    p.add_argument("--theirs_python", default=str(THEIRS), help="the interpreter that runs open_clip_train")
    p.add_argument("--pythonpath", default="", help="put first on PYTHONPATH for both (wheels unpacked elsewhere); the bench's own PYTHONPATH comes after this checkout")


def _brace_list(shards: str) -> str:
    tars = sorted(glob.glob(os.path.join(shards, "*.tar")))
    if not tars:
        raise SystemExit(f"no .tar shards in {shards}: run `make demo` (or pass --shards)")
    first, last = Path(tars[0]).stem, Path(tars[-1]).stem
    return os.path.join(shards, f"{{{first}..{last}}}.tar")


def _ours_cmd(args, run_dir: Path) -> list[str]:
    sets = {
        "data.train_shards": args.shards, "data.eval_tar": "null", "data.workers": args.workers,
        "model.name": args.model, "batch_size": args.batch_size, "steps": args.steps,
        "precision": args.precision, "optim.lr": 1e-3, "optim.warmup_steps": 50, "optim.weight_decay": 0.1,
        "optim.beta1": 0.9, "optim.beta2": 0.98, "optim.eps": 1e-6, "seed": 0, "log_every": LOG_EVERY,
        "run_dir": str(run_dir), "checkpoint.every_steps": 0, "tensorboard": "false",
        "device": args.device, "compile": str(args.compile).lower(),
    }  # fmt: skip
    cmd = [args.ours_python, "-m", "train"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


# our precision setting -> open_clip_train's --precision
THEIR_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}


def _theirs_cmd(args, logs: Path) -> list[str]:
    return [
        args.theirs_python, "-m", "bench.openclip_main", "--train-data", _brace_list(args.shards),
        "--dataset-type", "webdataset", "--train-num-samples", str(args.steps * args.batch_size),
        "--epochs", "1", "--batch-size", str(args.batch_size), "--workers", str(args.workers),
        "--model", args.model, "--precision", THEIR_PRECISION[args.precision], "--lr", "1e-3", "--warmup", "50",
        "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--seed", "0",
        "--log-every-n-steps", str(LOG_EVERY), "--save-frequency", "0", "--zeroshot-frequency", "0",
        "--logs", str(logs), "--name", "run", "--report-to", "",
    ] + (["--torchcompile"] if args.compile else [])  # fmt: skip


def _our_rate(run_dir: Path) -> tuple[float, float | None]:
    """Samples/s and MFU over all logged intervals but the first, from our log.jsonl."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "samples_per_s" in r and "step" in r and "loss" in r]
    samples = seconds = 0.0
    mfu_seconds: float | None = 0.0
    for prev, cur in zip(steps[1:], steps[2:]):  # skip the warm-up interval
        n = cur["samples_seen"] - prev["samples_seen"]
        samples += n
        seconds += n / cur["samples_per_s"]
        mfu_seconds = None if mfu_seconds is None or cur.get("mfu") is None else mfu_seconds + cur["mfu"] * n / cur["samples_per_s"]
    return samples / seconds, None if mfu_seconds is None else mfu_seconds / seconds


_THEIR_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+),")


def _their_rate(logs: Path, batch_size: int) -> float:
    """Samples/s from open_clip's log: each line's ``Batch (t)`` is the mean step time since the last."""
    text = (logs / "run" / "out.log").read_text()
    points = [(int(n), float(t)) for n, t in _THEIR_LINE.findall(text)]
    samples = seconds = 0.0
    for (prev_n, _), (cur_n, step_s) in zip(points[1:], points[2:]):  # skip the warm-up interval
        steps = (cur_n - prev_n) / batch_size
        samples += steps * batch_size
        seconds += steps * step_s
    return samples / seconds


def _pythonpath(args) -> str:
    """``--pythonpath``, this checkout, then whatever PYTHONPATH the bench itself was given."""
    return os.pathsep.join(filter(None, [args.pythonpath, str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _train_once(args, tool: str, repeat: int, work: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": _pythonpath(args)}
    target = work / f"{tool}-{repeat}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    cmd = _ours_cmd(args, target) if tool == "webclip" else _theirs_cmd(args, target)
    log = str(work / f"{tool}-{repeat}.log")
    measured = run_measured(cmd, env=env, log_path=log)
    if measured.returncode != 0:
        raise SystemExit(f"{tool} training failed (exit {measured.returncode}):\n{tail(log)}")
    rate, mfu = _our_rate(target) if tool == "webclip" else (_their_rate(target, args.batch_size), None)
    row = {"tool": tool, "repeat": repeat, "samples_per_s": round(rate, 1),
           "wall_s": round(measured.seconds, 1), "peak_rss_mib": round(measured.peak_rss_bytes / 2**20)}  # fmt: skip
    if mfu is not None:
        row["mfu"] = round(mfu, 4)
    return row


def _loader_once(args, tool: str) -> dict:
    python = args.ours_python if tool == "webclip" else args.theirs_python
    cmd = [str(python), "-m", "bench.loader_rate", "--tool", tool, "--shards", args.shards,
           "--batch_size", str(args.batch_size), "--batches", str(args.loader_batches), "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": _pythonpath(args)}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{tool} loader failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    """The comparison itself (loading alone unless ``--loader_batches 0``, then training), as a summary."""
    _brace_list(args.shards)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    loader, training = [], []
    for repeat in range(args.repeat):
        order = ["webclip", "open_clip"] if repeat % 2 == 0 else ["open_clip", "webclip"]
        for tool in order if args.loader_batches else ():
            loader.append(_loader_once(args, tool))
            print(json.dumps({"loader": loader[-1]}), file=sys.stderr, flush=True)
        for tool in order:
            training.append(_train_once(args, tool, repeat, work))
            print(json.dumps({"training": training[-1]}), file=sys.stderr, flush=True)

    def median(rows: list[dict], tool: str, key: str = "samples_per_s") -> float | None:
        values = [r[key] for r in rows if r["tool"] == tool and r.get(key) is not None]
        return statistics.median(values) if values else None

    def ratio(rows: list[dict]) -> float | None:
        ours, theirs = median(rows, "webclip"), median(rows, "open_clip")
        return round(ours / theirs, 2) if ours and theirs else None

    return {
        "bench": "train_vs_openclip", "model": args.model, "steps": args.steps, "batch_size": args.batch_size,
        "precision": args.precision, "workers": args.workers, "shards": args.shards, "device": args.device,
        "compile": args.compile, "training": training, "loader": loader,
        "training_ratio_median": ratio(training), "loader_ratio_median": ratio(loader),
        "our_mfu_median": median(training, "webclip", "mfu"),
        "interop": "open_clip_train trained from our shards without conversion",
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }  # fmt: skip


def main() -> int:
    args = _args()
    if not Path(args.theirs_python).exists():
        print(f"{args.theirs_python} not found: run `bash bench/peers.sh` first", file=sys.stderr)
        return 2
    save_result("train_vs_openclip", {**compare(args), "command": " ".join(sys.argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
