"""Small, deterministic train shards and eval tars for the trainer's tests and tuning.

The real data comes from ingest -> filter -> shards and ``infra/local/evalset.py``;
these fixtures imitate their layout (img2dataset / WebDataset: ``{key}.jpg``,
``{key}.txt``, ``{key}.json`` per sample, ``manifest.json`` beside the train shards)
so the trainer can be developed and tested without the other stages.

Scenes are rendered at a quarter to a half of their web size (a full-size render costs
~30 ms, and the 128 px result hardly differs), then resized to 128 px with the
project's own resizer in ``border`` mode, as the pipeline does.

As a script it writes a tuning set::

    python -m tests._train_fixtures --out data/train-fixture --samples 9000 --noise 0.2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

from infra.local import scenes
from infra.local.evalset import write_class_files
from ingest.resizer import ResizeConfig, resize_image

IMAGE_SIZE = 128  # the demo's shard size; the GPU benchmark writes 256 px (img2dataset's default)


def render_jpeg(scene: scenes.Scene, image_size: int = IMAGE_SIZE) -> bytes:
    """Render, encode as a web JPEG, then resize as the pipeline does."""
    buffer = io.BytesIO()
    scenes.render(scene).save(buffer, format="JPEG", quality=90)
    return resize_image(buffer.getvalue(), ResizeConfig(image_size=image_size, resize_mode="border")).data


def _small_dimensions(rng: random.Random, image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    width, height = scenes.web_dimensions(rng)
    divisor = rng.choice((2, 3, 4) if image_size <= IMAGE_SIZE else (1, 2))
    return max(32, width // divisor), max(32, height // divisor)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical tars for the same seed
    tar.addfile(info, io.BytesIO(data))


def train_sample(seed: int, index: int, noise: float, image_size: int = IMAGE_SIZE) -> tuple[bytes, str, dict]:
    """One seen-pair sample; with probability ``noise`` its caption names another seen pair."""
    rng = random.Random(f"train-{seed}-{index}")
    scene = scenes.sample_scene(rng, dimensions=_small_dimensions(rng, image_size))
    described = scene
    if rng.random() < noise:  # web noise: the caption describes a different image
        others = [p for p in scenes.SEEN_CLASSES if p != scene.pair]
        described = scenes.sample_scene(rng, others[rng.randrange(len(others))])
    text = scenes.caption(described, rng)
    meta = {"colour": scene.colour, "shape": scene.shape, "noisy": described is not scene}
    return render_jpeg(scene, image_size), text, meta


def _write_train_shard(args: tuple[str, int, int, int, int, float, int]) -> dict:
    folder, shard, start, count, seed, noise, image_size = args
    name = f"{shard:05d}.tar"
    path = os.path.join(folder, name)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, start + count):
            jpeg, text, meta = train_sample(seed, index, noise, image_size)
            key = f"{shard:05d}{index - start:04d}"
            meta["key"] = key
            _add(tar, f"{key}.jpg", jpeg)
            _add(tar, f"{key}.txt", text.encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
    with open(path, "rb") as handle:
        data = handle.read()
    return {"name": name, "count": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_train_shards(
    folder: str,
    samples: int,
    per_shard: int = 1000,
    seed: int = 0,
    noise: float = 0.2,
    manifest: bool = True,
    processes: int = 1,
    image_size: int = IMAGE_SIZE,
) -> list[dict]:
    """Write ``samples`` seen-pair samples as ``{n:05d}.tar`` shards (+ ``manifest.json``)."""
    if not 0 <= noise < 1:
        raise ValueError(f"noise={noise}: must be within [0, 1)")
    os.makedirs(folder, exist_ok=True)
    jobs = [
        (folder, shard, start, min(per_shard, samples - start), seed, noise, image_size)
        for shard, start in enumerate(range(0, samples, per_shard))
    ]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            entries = list(pool.map(_write_train_shard, jobs))
    else:
        entries = [_write_train_shard(job) for job in jobs]
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as handle:
            json.dump({"shards": entries, "config": {"seed": seed, "noise": noise}}, handle, indent=2)
    return entries


def eval_samples(per_class: int, seed: int = 1) -> Iterable[tuple[bytes, str, dict]]:
    """``per_class`` images of each of the 48 classes, held-out pairs included."""
    for class_index, pair in enumerate(scenes.CLASSES):
        for j in range(per_class):
            rng = random.Random(f"eval-{seed}-{class_index}-{j}")
            scene = scenes.sample_scene(rng, pair, allow_held_out=True, dimensions=_small_dimensions(rng))
            meta = {
                "colour": pair[0],
                "shape": pair[1],
                "class_index": class_index,
                "seen": pair not in scenes.HELD_OUT_PAIRS,
            }
            yield render_jpeg(scene), scenes.caption(scene, rng), meta


def write_eval_tar(path: str, per_class: int = 20, seed: int = 1) -> None:
    """The zero-shot eval set layout: ``{i:06d}.jpg|txt|json``, classes in ``scenes.CLASSES`` order.

    Beside it, as ``infra/local/evalset.py`` writes them: class names, templates, held-out list.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_class_files(os.path.dirname(os.path.abspath(path)))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (jpeg, text, meta) in enumerate(eval_samples(per_class, seed)):
            _add(tar, f"{i:06d}.jpg", jpeg)
            _add(tar, f"{i:06d}.txt", text.encode("utf-8"))
            _add(tar, f"{i:06d}.json", json.dumps(meta).encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder; writes OUT/train/*.tar and OUT/eval/eval.tar")
    parser.add_argument("--samples", type=int, default=9000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="train images' side, px (border mode)")
    args = parser.parse_args()
    write_train_shards(
        os.path.join(args.out, "train"), args.samples, args.per_shard, args.seed, args.noise,
        processes=args.processes, image_size=args.image_size,
    )
    write_eval_tar(os.path.join(args.out, "eval", "eval.tar"), args.eval_per_class, seed=args.seed + 1)



def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
    """A tar of exactly these (name, bytes) members, in order: for hand-made broken shards."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)


TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def write_tiny_model_config(folder: str, name: str = "webclip-test-tiny") -> str:
    """An open_clip model JSON small enough for a training step in milliseconds."""
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(TINY_MODEL, handle)
    return path


if __name__ == "__main__":
    main()
