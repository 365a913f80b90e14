"""Does filtering pay? The demo pool, filtered and not, trained for the same steps over seeds.

Runs on the demo's data (``make demo`` or ``python -m infra.local.demo --skip-train``
first), each step as the command a user would type:

    1. basic filter     every rule but the CLIP score → decisions, train shards
    2. bootstrap model  trained on the basic-filtered shards
    3. CLIP scores      of every pool sample under the bootstrap model (a worker pool, the model loaded once per worker)
    4. full filter      basic + CLIP score (top fraction) → decisions, graded against the
                        corpus's ground truth: mismatched captions removed, correct kept,
                        near duplicates found
    5. unfiltered       every downloaded sample with a caption (all rules off)
    6. same steps       a model per (set, seed) on the unfiltered and the filtered shards;
                        zero-shot accuracy on seen pairs and on the held-out pairs among
                        themselves

Results go to bench/results/curation.json; BENCHMARKS.md quotes them.

    python -m bench.curation --seeds 0 1 2 --steps 400
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import save_result
from infra.local import composition
from infra.local.truth import grade_mismatches, grade_near_duplicates

DATA = "data/demo"
OUT = "runs/curation"
UNFILTERED = [  # every rule off: what ingest downloaded, with a caption
    "--dedupe_url", "false", "--dedupe_exact", "false", "--dedupe_near", "false", "--min_caption_chars", "0",
    "--min_caption_words", "0", "--reject_boilerplate_captions", "false", "--min_image_size", "0",
    "--max_aspect_ratio", "1000", "--min_luma_std", "0", "--languages", "[]", "--decontaminate", "",
]


def run(command: list[str], log: Path | None = None) -> None:
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.time()
    with open(log, "w") if log else open("/dev/null", "w") as sink:
        result = subprocess.run(command, stdout=sink if log else None, stderr=subprocess.STDOUT if log else None)
    if result.returncode:
        raise SystemExit(f"curation: command failed (exit {result.returncode}){f'; see {log}' if log else ''}")
    print(f"  ({time.time() - start:.0f}s)", flush=True)


def filter_and_shard(name: str, extra: list[str], py: str) -> str:
    decisions, train = f"{OUT}/{name}/decisions", f"{OUT}/{name}/train"
    run([py, "-m", "filter", "--config", "configs/demo/filter.yaml", "--output_folder", decisions,
         "--progress", "false", *extra])
    run([py, "-m", "shards", "--config", "configs/demo/shards.yaml", "--decisions", decisions,
         "--output_folder", train, "--progress", "false"])
    return train


def train(train_shards: str, run_dir: str, steps: int, seed: int, py: str) -> dict:
    """Train (unless done before) and return the demo's zero-shot figures of the run."""
    if not (Path(run_dir) / "zeroshot.json").exists():
        run([py, "-m", "train", "--config", "configs/demo/train.yaml", "--set", f"data.train_shards={train_shards}",
             "--set", f"steps={steps}", "--set", f"seed={seed}", "--set", f"run_dir={run_dir}",
             "--set", f"checkpoint.every_steps={steps}", "--set", "tensorboard=false"], Path(f"{run_dir}.log"))
    return composition.figures(run_dir, f"{DATA}/eval").as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps of every compared model")
    parser.add_argument("--bootstrap-steps", type=int, default=600)
    parser.add_argument("--clip-top-fraction", type=float, default=0.8,
                        help="share of otherwise acceptable samples the CLIP rule keeps")
    args = parser.parse_args(argv)
    py = sys.executable
    Path(OUT).mkdir(parents=True, exist_ok=True)
    corpus = f"{DATA}/corpus"

    basic = filter_and_shard("basic", [], py)
    bootstrap = train(basic, f"{OUT}/bootstrap", args.bootstrap_steps, 0, py)
    run([py, "-m", "filter.clipscore", "--pool", f"{DATA}/pool", "--checkpoint", f"{OUT}/bootstrap/checkpoints",
         "--output_folder", f"{OUT}/clipscore", "--progress", "false"])
    filtered = filter_and_shard("filtered", ["--clip_scores", f"{OUT}/clipscore",
                                             "--clip_top_fraction", str(args.clip_top_fraction)], py)
    unfiltered = filter_and_shard("unfiltered", UNFILTERED, py)

    summary: dict = {
        "bootstrap_zero_shot": {k: bootstrap.get(k) for k in ("seen", "unseen", "unseen_only")},
        "clip_rule": grade_mismatches(f"{OUT}/filtered/decisions", corpus),
        "near_duplicates": grade_near_duplicates(f"{OUT}/filtered/decisions", corpus).as_dict(),
        "train_samples": {name: json.loads(Path(f"{OUT}/{name}/train/manifest.json").read_text()).get("total_samples")
                          for name in ("unfiltered", "basic", "filtered")},
        "steps": args.steps, "seeds": args.seeds, "runs": [],
    }
    for seed in args.seeds:
        for name, shards in (("unfiltered", unfiltered), ("filtered", filtered)):
            figures = train(shards, f"{OUT}/{name}-seed{seed}", args.steps, seed, py)
            summary["runs"].append({"set": name, "seed": seed, "seen": figures["seen"],
                                    "unseen_only": figures["unseen_only"], "unseen": figures["unseen"]})
            print(f"  {name:<10} seed {seed}: seen={figures['seen']:.3f} unseen_only={figures['unseen_only']:.3f}",
                  flush=True)
    for metric in ("seen", "unseen_only"):
        means = {}
        for name in ("unfiltered", "filtered"):
            values = [r[metric] for r in summary["runs"] if r["set"] == name]
            means[name] = {"mean": round(statistics.mean(values), 4),
                           "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
        wins = sum(1 for seed in args.seeds
                   if _figure(summary, "filtered", seed, metric) > _figure(summary, "unfiltered", seed, metric))
        summary[metric] = {**means, "filtered_wins": f"{wins}/{len(args.seeds)}"}
    summary["command"] = "python -m bench.curation " + " ".join(argv if argv is not None else sys.argv[1:])
    save_result("curation", summary)
    return 0


def _figure(summary: dict, name: str, seed: int, metric: str) -> float:
    return next(r[metric] for r in summary["runs"] if r["set"] == name and r["seed"] == seed)


if __name__ == "__main__":
    sys.exit(main())
