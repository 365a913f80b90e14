"""Issue 19's GPU benchmark: ViT-B-32 and ViT-B-16 at 224 px, ours against open_clip_train, one command.

It needs a CUDA GPU (the ``device`` tool lends an H100 to some sessions; CI never runs
it) and is sized to finish in under 8 minutes on one H100. From the repository root
there, with open_clip_torch, open_clip_train, webdataset and their needs importable
(``--pythonpath``; nothing can be downloaded on that machine)::

    python3 -m bench.train_gpu --pythonpath /tmp/site
    python3 -m bench.train_gpu --dry_run        # the same code paths on a CPU, tiny sizes (a test runs it)

For each model, in this order, while the time budget (``--budget_s``) lasts:

1. **probe**: the largest batch whose step peaks under ``--memory_margin`` of the GPU's
   memory, ours (bf16 weights, fast modules) and today's path (fp32 weights under bf16
   autocast, open_clip's modules: what open_clip_train runs), from the largest candidate down;
2. **step alone**: the trainer's own step (``train.loop.train_step``) on random uint8
   batches, no input pipeline, compiled: samples/s, MFU (FLOPs counted as training
   computes them, ``train/throughput.py``), peak memory; today's path too (B-32);
3. **trainers**: ``python -m train`` (compiled, at our batch) and
   ``open_clip_train.main`` (at its batch; ``--their_compile`` for ``--torchcompile``)
   on the same shards (``--samples`` synthetic 256 px samples, written once with every
   core into ``--work``), each tool's own step timing after the first log interval;
   our log's data wait share says whether the loader keeps up;
4. **extras**: the kernel profile of our eager step (top kernels), and the step alone
   with patch dropout 0.5 and with 32-token text: rows of their own (they change the
   work, not the efficiency).

Prints the table (markdown) and writes bench/results/train_gpu.json (and ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Batch candidates, largest first, for our path and for today's (fp32 weights under autocast: what
# open_clip_train runs; 1,792 was its largest for ViT-B-32 on an H100 80 GB, BENCHMARKS.md).
CANDIDATES = {
    "ViT-B-32": (4096, 3584, 3072, 2560, 2048, 1792, 1536, 1024, 512),
    "ViT-B-16": (1536, 1280, 1024, 896, 768, 640, 512, 256),
}
CANDIDATES_TODAY = {
    "ViT-B-32": (2048, 1792, 1536, 1280, 1024, 512),
    "ViT-B-16": (768, 640, 512, 384, 256),
}
GOALS = {"ViT-B-32": ("≥ 9,000", "≥ 40%", "~6,250, ~28%"), "ViT-B-16": ("≥ 3,600", "≥ 45%", "not measured")}
DRY_MODEL = "webclip-tiny-vit"  # train/model_configs: a ViT small enough for a CPU


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B-32,ViT-B-16")
    p.add_argument("--samples", type=int, default=16_000, help="train samples to write (once, kept in --work)")
    p.add_argument("--per_shard", type=int, default=1000)
    p.add_argument("--image_size", type=int, default=256, help="side of the written images, px")
    p.add_argument("--work", default="data/gpu-bench", help="shards and runs")
    p.add_argument("--memory_margin", type=float, default=0.85, help="a batch fits if its step peaks under this share")
    p.add_argument("--probe_steps", type=int, default=10, help="timed steps of the step alone (after 2 warm-up)")
    p.add_argument("--steps", type=int, default=30, help="steps of each trainer run (the first 10 are warm-up)")
    p.add_argument("--workers", type=int, default=12, help="DataLoader workers of both trainers")
    p.add_argument("--their_compile", action="store_true", help="open_clip_train with --torchcompile (+1 min)")
    p.add_argument("--budget_s", type=float, default=450, help="optional parts are skipped past this many seconds")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the step alone")
    p.add_argument("--pythonpath", default="", help="prepended to PYTHONPATH of the trainers")
    p.add_argument("--python", default=sys.executable, help="the interpreter of both trainers")
    p.add_argument("--theirs_python", default="", help="open_clip_train's interpreter; default --python "
                                                       "(--dry_run: .bench/openclip's if there)")
    p.add_argument("--out", default="", help="also copy the results JSON and profiles into this folder")
    p.add_argument("--dry_run", action="store_true", help="CPU, a tiny ViT, tiny sizes: the same code paths")
    args = p.parse_args(argv)
    args.device = "cuda"
    args.candidates = {m: CANDIDATES.get(m, CANDIDATES["ViT-B-16"]) for m in args.models.split(",")}
    args.candidates_today = {m: CANDIDATES_TODAY.get(m, CANDIDATES_TODAY["ViT-B-16"]) for m in args.models.split(",")}
    if args.dry_run:
        args.device, args.models = "cpu", DRY_MODEL
        args.candidates, args.candidates_today = {DRY_MODEL: (16, 8)}, {DRY_MODEL: (16, 8)}
        args.samples, args.per_shard, args.image_size, args.probe_steps, args.workers = 96, 32, 64, 2, 1
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"  # inductor's C++ build takes minutes on a small CPU
        if args.work == "data/gpu-bench":
            args.work = "data/gpu-bench-dry"
    if not args.theirs_python and args.dry_run:  # here open_clip_train lives in its own venv (bench/peers.sh)
        from bench.train_vs_openclip import THEIRS

        args.theirs_python = str(THEIRS) if THEIRS.exists() else ""
    args.theirs_python = args.theirs_python or args.python
    return args


class Clock:
    """The run's time budget: optional parts ask whether they still fit."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.budget_s


def _log(*parts) -> None:
    print("train_gpu:", *parts, file=sys.stderr, flush=True)


def _shards(args) -> Path:
    folder = ROOT / args.work / "train"
    manifest = folder / "manifest.json"
    if manifest.exists() and sum(s["count"] for s in json.loads(manifest.read_text())["shards"]) >= args.samples:
        return folder
    from tests._train_fixtures import write_train_shards

    began = time.perf_counter()
    write_train_shards(str(folder), args.samples, args.per_shard, processes=os.cpu_count() or 1,
                       image_size=args.image_size)  # fmt: skip
    _log(f"shards: {args.samples} samples in {time.perf_counter() - began:.0f} s")
    return folder


# -- the step alone ------------------------------------------------------------------------------------


def _step_fn(args, model_name: str, batch: int, *, fast: bool, compile_: bool | str, **model_kwargs):
    """The trainer's own step on random uint8 batches; ``fast``: bf16 weights + fast modules, else today's path."""
    import torch

    from core.device import prepare
    from train import fast as fast_mod
    from train import model as model_mod
    from train.config import OptimConfig
    from train.loop import build_stepper, train_step

    device = torch.device(args.device)
    compute = prepare(device, "bf16" if device.type == "cuda" else "fp32", threads=torch.get_num_threads())
    torch.manual_seed(0)
    model = model_mod.create_model(model_name, device=compute.device, **model_kwargs)
    size, context = model_mod.image_size_of(model), int(model.context_length)
    if fast:
        fast_mod.speed_up(model)
    worker_dtype = torch.bfloat16 if fast and compute.amp_dtype == torch.bfloat16 else None
    stepper = build_stepper(model, compute, OptimConfig(lr=1e-4), channels_last=True, compile=compile_,
                            worker_dtype=worker_dtype)  # fmt: skip
    micro_batch = (torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device),
                   torch.randint(1, 49407, (batch, context), device=device))  # fmt: skip

    def step():
        return train_step(stepper, [micro_batch], 1, 1e-4)

    return step, model, size


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_share(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / torch.cuda.get_device_properties(0).total_memory


def _largest_batch(args, model_name: str, fast: bool) -> tuple[int, list[dict]]:
    """The largest candidate whose two eager steps fit under the margin (on a CPU: the largest that runs)."""
    import torch

    tried = []
    candidates = (args.candidates if fast else args.candidates_today)[model_name]
    for batch in candidates:
        _free(args.device)
        fits = True
        try:
            step, _, _ = _step_fn(args, model_name, batch, fast=fast, compile_=False)
            for _ in range(2):  # the second step holds the optimizer's state too
                step()
            _sync(args.device)
            del step
        except torch.OutOfMemoryError:
            fits = False
        share = _peak_share(args.device)
        fits = fits and (share is None or share <= args.memory_margin)
        tried.append({"batch_size": batch, "fits": fits, "peak_memory_share": None if share is None else round(share, 3)})
        _log(f"probe {model_name} {'ours' if fast else 'today'}: {tried[-1]}")
        _free(args.device)
        if fits:
            return batch, tried
    raise SystemExit(f"probe: not even a batch of {candidates[-1]} fits {model_name}")


def _time_step(args, model_name: str, batch: int, *, fast: bool, compile_: bool | str, label: str,
               **model_kwargs) -> dict:  # fmt: skip
    import torch

    from train import throughput

    _free(args.device)
    step, model, size = _step_fn(args, model_name, batch, fast=fast, compile_=compile_, **model_kwargs)
    device = torch.device(args.device)
    flops = throughput.train_flops_per_sample(model, size, device)
    peak = throughput.peak_flops(device, None)
    began = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    _sync(args.device)
    warm_s = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(args.probe_steps):
        loss = step()
    _sync(args.device)
    seconds = time.perf_counter() - began
    share = _peak_share(args.device)
    row = {"model": model_name, "run": label, "batch_size": batch, "step_ms": round(1000 * seconds / args.probe_steps, 1),
           "warmup_s": round(warm_s, 1), "gflops_per_sample": None if flops is None else round(flops / 1e9, 2),
           "peak_memory_gib": None if share is None else round(share * torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
           "loss": round(float(loss), 3), **model_kwargs,
           **throughput.speed_record(batch * args.probe_steps, seconds, 1, flops, peak)}  # fmt: skip
    del step, model
    _free(args.device)
    _log(f"step alone: {row}")
    return row


def _profile(args, model_name: str, batch: int) -> str:
    """torch.profiler's table of the eager fast step's kernels, top 15 by device time."""
    from torch.profiler import ProfilerActivity, profile

    step, _, _ = _step_fn(args, model_name, batch, fast=True, compile_=False)
    for _ in range(2):
        step()
    _sync(args.device)
    on_gpu = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
        _sync(args.device)
    del step
    _free(args.device)
    key = "cuda_time_total" if on_gpu else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)


# -- the trainers ----------------------------------------------------------------------------------


def _trainer(args, shards: Path, model_name: str, tool: str, batch: int, smaller: tuple[int, ...] = ()) -> dict:
    """One run of one tool through bench/train_vs_openclip.py; a failure is a row, not the end of the bench.

    Out of memory (the trainer's own data path and workspace beside the probed step),
    it runs again at the next of the ``smaller`` batches.
    """
    from bench import train_vs_openclip as tvo

    compare_args = argparse.Namespace(
        shards=str(shards), model=model_name, steps=args.steps, batch_size=batch,
        precision="bf16" if args.device == "cuda" else "fp32", workers=args.workers, device=args.device,
        compile=(args.device == "cuda") if tool == "webclip" else args.their_compile,
        ours_python=args.python, theirs_python=args.theirs_python, pythonpath=args.pythonpath,
    )  # fmt: skip
    work = ROOT / args.work / "runs"
    work.mkdir(parents=True, exist_ok=True)
    try:
        row = tvo._train_once(compare_args, tool, 0, work / model_name)
    except SystemExit as exc:  # the tool failed (or open_clip_train is not importable): say so in the table
        _log(f"{tool} {model_name} failed: {str(exc)[-2000:]}")
        if smaller and "out of memory" in str(exc).lower():
            return _trainer(args, shards, model_name, tool, smaller[0], smaller[1:])
        return {"model": model_name, "run": tool, "batch_size": batch, "error": str(exc).splitlines()[0][:200]}
    row.update({"model": model_name, "run": tool, "batch_size": batch, "compile": compare_args.compile})
    if tool == "webclip":
        log = ROOT / args.work / "runs" / model_name / "webclip-0" / "zeroshot.json"
        summary = json.loads(log.read_text())["train"]
        row["data_wait_share"] = summary.get("data_wait_share")
    _log(f"trainer: {row}")
    return row


def _their_mfu(rows: list[dict], model_name: str, device: str) -> None:
    """open_clip_train's MFU from its rate and our honest count of the same model's FLOPs."""
    import torch

    from train import throughput

    gflops = next((r.get("gflops_per_sample") for r in rows if r["model"] == model_name and r.get("gflops_per_sample")),
                  None)  # fmt: skip
    peak = throughput.peak_flops(torch.device(device), None)
    for r in rows:
        if r["model"] == model_name and r["run"] == "open_clip" and "samples_per_s" in r and gflops and peak:
            r["mfu"] = round(r["samples_per_s"] * gflops * 1e9 / peak, 4)


# -- the table ------------------------------------------------------------------------------------


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(rows: list[dict]) -> str:
    lines = ["| model | run | batch | samples/s | MFU (honest count) | goal | today | data wait | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        goal = GOALS.get(r["model"], ("–", "–", "–"))
        rate = "error: " + r["error"] if "error" in r else f"{r.get('samples_per_s', 0):,.0f}"
        memory = "–" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']} GiB"
        extra = "".join(f", {k}={r[k]}" for k in ("force_patch_dropout", "force_context_length") if k in r)
        lines.append(f"| {r['model']}{extra} | {r['run']} | {r['batch_size']} | {rate} | {_percent(r.get('mfu'))} | "
                     f"{goal[0]}, {goal[1]} | {goal[2]} | {_percent(r.get('data_wait_share'))} | {memory} |")  # fmt: skip
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    clock = Clock(args.budget_s)
    shards = _shards(args)
    summary: dict = {"bench": "train_gpu", "issue": 19, "command": " ".join(sys.argv), "cpus": os.cpu_count(),
                     "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "rows": [], "probes": {}, "profiles": {}, "skipped": []}  # fmt: skip
    rows, plan = summary["rows"], {}
    compiled = True if args.compile_backend == "inductor" else args.compile_backend

    def attempt(model_name: str, batch: int, label: str, part):
        """A row from ``part()``, or a row that names its error: one failure does not end the bench."""
        try:
            return part()
        except Exception as exc:  # noqa: BLE001
            _log(f"{model_name} {label} failed: {exc!r}")
            return {"model": model_name, "run": label, "batch_size": batch, "error": repr(exc)[:200]}

    for model_name in args.models.split(","):
        ours_batch, ours_tried = _largest_batch(args, model_name, fast=True)
        their_batch, their_tried = _largest_batch(args, model_name, fast=False)
        summary["probes"][model_name] = {"ours": ours_tried, "today": their_tried}
        plan[model_name] = (ours_batch, their_batch)
        label = "ours, step alone"
        rows.append(attempt(model_name, ours_batch, label, lambda: _time_step(
            args, model_name, ours_batch, fast=True, compile_=compiled, label=label)))  # fmt: skip
        for tool, batch, candidates in (("webclip", ours_batch, args.candidates[model_name]),
                                        ("open_clip", their_batch, args.candidates_today[model_name])):  # fmt: skip
            rows.append(_trainer(args, shards, model_name, tool, batch, tuple(c for c in candidates if c < batch)))
        _their_mfu(rows, model_name, args.device)
    for model_name, (ours_batch, their_batch) in plan.items():  # optional: while the budget lasts
        extras = [
            ("today's path, step alone", lambda: _time_step(args, model_name, their_batch, fast=False,
                                                             compile_=compiled, label="today's path, step alone")),
            ("profile", lambda: summary["profiles"].__setitem__(model_name, _profile(args, model_name, ours_batch))),
            ("patch dropout 0.5", lambda: _time_step(args, model_name, ours_batch, fast=True, compile_=compiled,
                                                     label="ours, step alone", force_patch_dropout=0.5)),
            ("32-token text", lambda: _time_step(args, model_name, ours_batch, fast=True, compile_=compiled,
                                                 label="ours, step alone", force_context_length=32)),
        ]  # fmt: skip
        for name, part in extras:
            if not clock.allows(45 if args.device == "cuda" else 0):
                summary["skipped"].append(f"{model_name}: {name} (time budget)")
                continue
            result = attempt(model_name, ours_batch, name, part)
            if isinstance(result, dict):
                rows.append(result)
    summary["seconds"] = round(clock.elapsed(), 1)
    summary["table"] = _table(rows)
    return summary


def main(argv=None) -> int:
    args = _args(argv)
    summary = run(args)
    from bench.measure import save_result

    save_result("train_gpu_dry" if args.dry_run else "train_gpu", summary)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "train_gpu.json").write_text(json.dumps(summary, indent=2))
    for model_name, table in summary["profiles"].items():
        print(f"\n{model_name}: top kernels of our eager step\n{table}")
    if summary["skipped"]:
        print("\nskipped: " + "; ".join(summary["skipped"]))
    print(f"\n{summary['device']}, torch {summary['torch']}, {summary['seconds']} s\n")
    print(summary["table"], flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
