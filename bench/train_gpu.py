"""Issue 4's GPU benchmark: ViT-B-32 at 224 px, bf16, the largest batch that fits.

Ours against open_clip_train in the same run, and our model FLOP utilisation (MFU).
It needs a CUDA GPU (the ``device`` tool lends an H100 to some sessions; CI never
runs this). On that machine, from the repository root, with open_clip_torch,
webdataset 0.2.86 and their needs importable (``--pythonpath``)::

    python3 -m bench.train_gpu --pythonpath /tmp/site            # all stages
    python3 -m bench.train_gpu --stages shards,probe              # some of them

The stages, each cached in ``--work`` so that a later call can go on from it:

1. **shards**: ``--samples`` synthetic (image, caption) samples at 256 px (img2dataset's
   usual size; the scenes of tests/_train_fixtures.py), written with every core;
2. **probe**: the largest batch that fits, and the GPU step alone: the trainer's own
   step function (``train.loop.train_step``: normalisation, bf16 autocast, contrastive
   loss, fused AdamW) on random uint8 batches (no input pipeline), from the largest
   candidate batch down until one
   fits under ``--memory_margin`` of the GPU's memory; then that step timed eager and
   compiled: the ceiling of samples/s and MFU for this model on this GPU;
3. **train**: bench/train_vs_openclip.py's comparison at that batch, on ``--device
   cuda``, ``--precision bf16``: ``python -m train`` and ``python -m open_clip_train.main``
   on the same shards with the same DataLoader workers, eager and (``--compile``)
   compiled. Samples/s is each tool's own step timing after the first log interval;
   MFU is our trainer's own figure (model FLOPs counted once with FlopCounterMode, over
   the device's dense bf16 peak, train/throughput.py).

Writes bench/results/train_gpu.json (and a copy into ``--out`` if given).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = (8192, 6144, 5120, 4096, 3584, 3072, 2560, 2048, 1792, 1536, 1280, 1024, 768, 512, 256)
STAGES = ("shards", "probe", "train", "profile")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--samples", type=int, default=48_000, help="train samples to write (shards stage)")
    p.add_argument("--per_shard", type=int, default=1000)
    p.add_argument("--image_size", type=int, default=256, help="side of the written images, px")
    p.add_argument("--work", default="data/gpu-bench", help="shards and the probe's result (kept between stages)")
    p.add_argument("--memory_margin", type=float, default=0.85, help="a batch fits if its step peaks under this share")
    p.add_argument("--batch_size", type=int, default=0, help="0: the probe's largest batch that fits")
    p.add_argument("--probe_steps", type=int, default=30, help="timed steps of the GPU step alone")
    p.add_argument("--steps", type=int, default=60, help="steps of each trainer run (the first log interval is warm-up)")
    p.add_argument("--workers", type=int, default=12, help="DataLoader workers of both trainers")
    p.add_argument("--variants", default="eager,compile", help="trainer runs: eager and/or compile")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the trainers")
    p.add_argument("--python", default=sys.executable, help="the interpreter of both trainers")
    p.add_argument("--out", default="", help="also copy the results JSON into this folder")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script itself (needs --batch_size)")
    args = p.parse_args()
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    return args


def _shards(args) -> Path:
    folder = ROOT / args.work / "train"
    if (folder / "manifest.json").exists():
        print(f"shards: {folder} is there", file=sys.stderr)
        return folder
    from tests._train_fixtures import write_train_shards

    began = time.perf_counter()
    write_train_shards(str(folder), args.samples, args.per_shard, processes=os.cpu_count() or 1,
                       image_size=args.image_size)  # fmt: skip
    size = sum(f.stat().st_size for f in folder.glob("*.tar"))
    print(f"shards: {args.samples} samples, {size / 2**20:.0f} MiB in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return folder


def _step_fn(model_name: str, batch: int, compile_: bool, device, channels_last: bool = True):
    """The trainer's own step (train.loop.train_step) on random uint8 batches: returns (step, model, image size)."""
    import torch

    from core.device import prepare
    from train import model as model_mod
    from train.config import OptimConfig
    from train.loop import build_stepper, train_step

    compute = prepare(device, "bf16" if device.type == "cuda" else "fp32", threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = model_mod.create_model(model_name, device=compute.device)
    size = model_mod.image_size_of(model)
    stepper = build_stepper(model, compute, OptimConfig(lr=1e-4), channels_last=channels_last, compile=compile_)
    context = int(getattr(model, "context_length", 77))
    micro_batch = (torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=compute.device),
                   torch.randint(1, 49407, (batch, context), device=compute.device))  # fmt: skip

    def step() -> None:
        train_step(stepper, [micro_batch], 1, 1e-4)

    return step, model, size


def _fits(model_name: str, batch: int, margin: float, device) -> tuple[bool, float]:
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fits = True
    try:
        step, _, _ = _step_fn(model_name, batch, False, device)
        for _ in range(2):  # the second step holds the optimizer's state too
            step()
        torch.cuda.synchronize()
        del step
    except torch.OutOfMemoryError:
        fits = False
    gc.collect()  # the failed try's model and optimizer, before the next one
    torch.cuda.empty_cache()
    share = torch.cuda.max_memory_allocated() / torch.cuda.get_device_properties(0).total_memory
    return fits and share <= margin, share


def _time_step(model_name: str, batch: int, compile_: bool, steps: int, device, channels_last: bool = True) -> dict:
    import torch

    from train import model as model_mod
    from train import throughput

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step, model, size = _step_fn(model_name, batch, compile_, device, channels_last)
    flops = throughput.train_flops_per_sample(model, size, device)
    peak = throughput.peak_flops(device, None)
    parameters = model_mod.count_parameters(model)
    began = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    warm_s = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - began
    del step, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"compile": compile_, "channels_last": channels_last, "batch_size": batch, "steps": steps, "step_ms": round(1000 * seconds / steps, 1),
            "warmup_s": round(warm_s, 1), "gflops_per_sample": None if flops is None else round(flops / 1e9, 2),
            "parameters_m": round(parameters / 1e6, 1), **throughput.speed_record(batch * steps, seconds, 1, flops, peak)}  # fmt: skip


def _probe(args) -> dict:
    import torch

    device = torch.device(args.device)
    path = ROOT / args.work / f"probe-{args.model}.json"
    if path.exists() and not args.batch_size:
        print(f"probe: {path} is there", file=sys.stderr)
        return json.loads(path.read_text())
    tried = []
    batch = args.batch_size
    if not batch:
        if device.type != "cuda":
            raise SystemExit("probe: the largest batch is searched on a GPU only; give --batch_size")
        for candidate in CANDIDATES:
            fits, share = _fits(args.model, candidate, args.memory_margin, device)
            tried.append({"batch_size": candidate, "fits": fits, "peak_memory_share": round(share, 3)})
            print(f"probe: {tried[-1]}", file=sys.stderr, flush=True)
            if fits:
                batch = candidate
                break
        if not batch:
            raise SystemExit(f"probe: not even a batch of {CANDIDATES[-1]} fits")
    on_gpu = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if on_gpu else None,
        "torch": torch.__version__, "batch_size": batch, "memory_margin": args.memory_margin, "tried": tried,
        "step_alone": [_time_step(args.model, batch, c, args.probe_steps, device, last)
                       for last in (True, False) for c in (False, True)],
    }  # fmt: skip
    for row in result["step_alone"]:
        print(f"probe: step alone {row}", file=sys.stderr, flush=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _profile(args, batch: int) -> str:
    """Where the GPU step's time goes: torch.profiler's kernel table over a few eager steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step, _, _ = _step_fn(args.model, batch, False, torch.device(args.device))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)


def _train(args, shards: Path, batch: int) -> list[dict]:
    from bench import train_vs_openclip

    runs = []
    for variant in args.variants.split(","):
        compare_args = argparse.Namespace(
            shards=str(shards), model=args.model, steps=args.steps, batch_size=batch,
            precision="bf16" if args.device == "cuda" else "fp32", workers=args.workers, repeat=args.repeat,
            loader_batches=0, work=f"{args.work}/runs-{variant}", device=args.device, compile=variant == "compile", ours_python=args.python, theirs_python=args.python,
            pythonpath=args.pythonpath,
        )  # fmt: skip
        runs.append({"variant": variant, **train_vs_openclip.compare(compare_args)})
        print(json.dumps({k: runs[-1][k] for k in ("variant", "training_ratio_median", "our_mfu_median")}),
              file=sys.stderr, flush=True)  # fmt: skip
    return runs


def main() -> int:
    args = _args()
    stages = args.stages.split(",")
    shards = _shards(args) if "shards" in stages else ROOT / args.work / "train"
    summary: dict = {"bench": "train_gpu", "model": args.model, "command": " ".join(sys.argv), "cpus": os.cpu_count()}
    if "probe" in stages or (not args.batch_size and ("train" in stages or "profile" in stages)):
        summary["probe"] = _probe(args)
    if "profile" in stages:
        table = _profile(args, args.batch_size or summary["probe"]["batch_size"])
        print(table, file=sys.stderr)
        if args.out:
            Path(args.out, "profile.txt").write_text(table)
    if "train" in stages:
        summary["train"] = _train(args, shards, args.batch_size or summary["probe"]["batch_size"])
    from bench.measure import save_result

    save_result("train_gpu", summary)
    if args.out:
        Path(args.out, "train_gpu.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
