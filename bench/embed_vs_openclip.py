"""Embedding speed against open_clip's own encode loop, and the embed stage's memory.

    .venv/bin/python -m bench.embed_vs_openclip                 # the demo's train shards

Throughput, per model (webclip-tiny at 48 px, ViT-B-32 at 224 px; both untrained and
seeded: speed does not depend on the weights): the same images (the first ``--images``
samples of the demo's train shards, written once into a subset shard), the same batch
size and the same torch threads, alternating rounds in one process:

* **ours**: one embed-stage worker (``apply.embed.Embedder``, what each worker of
  ``python -m apply.embed`` runs: read the tar, the trainer's DCT-scaled decode in a
  reader thread, image and caption embeddings, float16 files written);
* **open_clip**: ``open_clip.create_model_and_transforms`` (its preprocess: PIL decode,
  bicubic resize, centre crop, ToTensor, Normalize), the tar read with ``tarfile``,
  ``model.encode_image`` and ``model.encode_text`` in batches, normalised, float16.

Each side encodes one untimed batch first (oneDNN builds its kernels on first use). Images
per wall second and per CPU second of the process (``time.process_time``: every
thread): "per core" is the second. Memory: the whole ``python -m apply.embed`` command
on N and 4N shards (webclip-tiny), peak RSS of its process tree (``bench.measure``).
Results go to bench/results/embed_vs_openclip.json; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as every stage's worker sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.measure import run_measured, save_result  # noqa: E402

DEMO_TRAIN = str(Path(__file__).resolve().parents[1] / "data/demo/train")  # what `make demo` makes


def write_subset(source: str, out: str, images: int) -> str:
    """The first ``images`` samples of ``source``'s shards, as one shard ``00000.tar`` in ``out``."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "00000.tar")
    keys: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as dst:
        for tar in sorted(Path(source).glob("*.tar")):
            with tarfile.open(tar) as src:
                for member in src:
                    key = member.name.split(".", 1)[0]
                    if key not in keys and len(keys) == images:
                        return path
                    keys.add(key)
                    dst.addfile(member, src.extractfile(member))
    return path


def save_untrained(name: str, folder: str) -> str:
    from train import checkpoint as ckpt
    from train import model as model_mod

    torch.manual_seed(0)
    model = model_mod.create_model(name)
    ckpt.save_checkpoint(folder, model, ckpt.TrainProgress(0, 0, 0), name, model_mod.image_size_of(model), {})
    return ckpt.model_file(folder)


def ours(model_file: str, tar: str, batch: int, threads: int, out: str) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of one embed-stage worker over ``tar`` (model loading excluded)."""
    from apply.embed import EmbedConfig, Embedder

    cfg = EmbedConfig(checkpoint=model_file, shards=os.path.dirname(tar), output_folder=out, batch_size=batch,
                      device="cpu", threads_per_worker=threads, progress=False)  # fmt: skip
    embedder = Embedder(cfg, model_file, "cpu", threads)
    size = embedder.model.image_size  # one untimed batch first: oneDNN builds its kernels on first use
    embedder.encode(torch.zeros((batch, 3, size, size), dtype=torch.uint8), ["warm up"] * batch)
    wall, cpu = time.perf_counter(), time.process_time()
    done = embedder.embed_shard(0, tar, out)
    return done["rows"], time.perf_counter() - wall, time.process_time() - cpu


def open_clip_loop(name: str, model_file: str, tar: str, batch: int, threads: int) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of open_clip's own encode loop over ``tar`` (model creation excluded)."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=model_file)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    torch.set_num_threads(threads)
    size = preprocess.transforms[1].size[0]  # CenterCrop; one untimed batch first, as for ours
    with torch.inference_mode():
        model.encode_image(torch.zeros((batch, 3, size, size)))
        model.encode_text(tokenizer(["warm up"] * batch))
    rows: list[np.ndarray] = []
    wall, cpu = time.perf_counter(), time.process_time()

    def encode(images: list, captions: list[str]) -> None:
        with torch.inference_mode():
            image_rows = torch.nn.functional.normalize(model.encode_image(torch.stack(images)), dim=-1)
            text_rows = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        rows.append(image_rows.half().numpy())
        rows.append(text_rows.half().numpy())

    images, captions, sample = [], [], {}
    with tarfile.open(tar) as src:
        for member in src:
            key, ext = member.name.split(".", 1)
            sample[ext] = src.extractfile(member).read()
            if "jpg" in sample and "txt" in sample:
                images.append(preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
                captions.append(sample["txt"].decode("utf-8"))
                sample = {}
                if len(images) == batch:
                    encode(images, captions)
                    images, captions = [], []
    if images:
        encode(images, captions)
    count = sum(len(r) for r in rows[::2])
    return count, time.perf_counter() - wall, time.process_time() - cpu


def throughput(name: str, tar: str, batch: int, threads: int, rounds: int, work: str) -> dict:
    model_file = save_untrained(name, os.path.join(work, f"ckpt-{name}"))
    figures: dict[str, list] = {"ours": [], "open_clip": []}
    for r in range(rounds):  # alternating, so a busy moment of the machine hits both
        out = os.path.join(work, f"emb-{name}-{threads}-{r}")
        figures["ours"].append(ours(model_file, tar, batch, threads, out))
        shutil.rmtree(out)
        figures["open_clip"].append(open_clip_loop(name, model_file, tar, batch, threads))
    result: dict = {"model": name, "threads": threads, "batch_size": batch, "rounds": rounds}
    for side, runs in figures.items():
        result[side] = {
            "images": runs[0][0],
            "images_per_s": round(statistics.median(n / w for n, w, _ in runs), 1),
            "images_per_cpu_s": round(statistics.median(n / c for n, _, c in runs), 1),
            "cpu_s_per_wall_s": round(statistics.median(c / w for _, w, c in runs), 2),
        }
    result["ratio_per_cpu_s"] = round(result["ours"]["images_per_cpu_s"] / result["open_clip"]["images_per_cpu_s"], 2)
    result["ratio_per_s"] = round(result["ours"]["images_per_s"] / result["open_clip"]["images_per_s"], 2)
    print(result, flush=True)
    return result


def peak_memory(source: str, shards: int, work: str, batch: int) -> dict:
    """The whole command on the first ``shards`` shards (links to them): peak RSS of its process tree."""
    folder = os.path.join(work, f"shards-{shards}")
    os.makedirs(folder, exist_ok=True)
    for tar in sorted(Path(source).glob("*.tar"))[:shards]:
        os.symlink(tar, os.path.join(folder, tar.name))
    model_file = save_untrained("webclip-tiny", os.path.join(work, "ckpt-memory"))
    out = os.path.join(work, f"emb-memory-{shards}")
    cmd = [sys.executable, "-m", "apply.embed", "--checkpoint", model_file, "--shards", folder, "--output_folder",
           out, "--distributor", "inline", "--batch_size", str(batch), "--progress", "false"]  # fmt: skip
    measured = run_measured(cmd, log_path=os.path.join(work, f"memory-{shards}.log"))
    if measured.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{open(os.path.join(work, f'memory-{shards}.log')).read()}")
    import json

    rows = json.loads(Path(out, "embeddings.json").read_text())["rows"]
    return {"shards": shards, "images": rows, "peak_rss_mib": round(measured.peak_rss_bytes / 2**20, 1),
            "seconds": round(measured.seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=DEMO_TRAIN, help="train shards (*.tar of 128 px images)")
    parser.add_argument("--images", type=int, default=2000, help="images per round, webclip-tiny")
    parser.add_argument("--vit_images", type=int, default=256, help="images per round, ViT-B-32")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory_shards", type=int, default=2, help="N: the memory runs read N and 4N shards")
    parser.add_argument("--skip_vit", action="store_true")
    args = parser.parse_args(argv)
    if not list(Path(args.shards).glob("*.tar")):
        raise SystemExit(f"--shards {args.shards}: no *.tar there (run `make demo` first, or give train shards)")
    work = tempfile.mkdtemp(prefix="embed-bench-")
    try:
        summary: dict = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]},
                         "throughput": [], "memory": []}  # fmt: skip
        tiny = write_subset(args.shards, os.path.join(work, "tiny"), args.images)
        vit = write_subset(args.shards, os.path.join(work, "vit"), args.vit_images)
        for threads in args.threads:
            summary["throughput"].append(throughput("webclip-tiny", tiny, args.batch_size, threads, args.rounds, work))
            if not args.skip_vit:
                rounds = max(1, args.rounds - 1)  # ViT-B-32 on a CPU is slow: one round fewer
                summary["throughput"].append(throughput("ViT-B-32", vit, args.batch_size, threads, rounds, work))
        for shards in (args.memory_shards, 4 * args.memory_shards):
            summary["memory"].append(peak_memory(args.shards, shards, work, args.batch_size))
            print(summary["memory"][-1], flush=True)
        small, large = summary["memory"]
        summary["memory_growth"] = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
        summary["machine"]["load_average_at_end"] = os.getloadavg()[0]
        save_result("embed_vs_openclip", summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
