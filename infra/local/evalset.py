"""The zero-shot evaluation set of the scene world, rendered directly (not via the web).

Every class of ``scenes.CLASSES`` appears, the held-out pairs included: accuracy on
those is the measure of compositional transfer, since training never saw them.
Images take the same path web images take into training shards (a JPEG at a web size,
then ``ingest.resizer.resize_image``), so an accuracy gap between seen and unseen
classes cannot come from a difference in preprocessing.

The output is a WebDataset-style tar with members ``{i:06d}.jpg``, ``{i:06d}.txt``
(a true caption) and ``{i:06d}.json`` (colour, shape, class_index into
``scenes.CLASSES``, seen). Its bytes are a pure function of the arguments: the seed
stream ``eval:{seed}:{i}`` is disjoint from the corpus's ``{seed}:{item}``, and tar
headers carry fixed owners and times. Beside it, as CLIP_benchmark lays out an eval
set (the trainer's zero-shot reads them): ``classnames.txt`` ("red circle", in
``scenes.CLASSES`` order), ``zeroshot_classification_templates.txt`` (the demo's
prompts, ``{c}`` for the class name) and ``held_out.txt`` (the held-out classes, for the
demo's own figures, ``infra/local/composition.py``).

    python -m infra.local.evalset --out eval.tar --per-class 20 --seed 0 \\
        --image-size 128 --resize-mode border
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from core.tarwriter import TarWriter
from infra.local import scenes
from ingest.resizer import RESIZE_MODES, ResizeConfig, resize_image

SOURCE_JPEG_QUALITY = 90  # the "web" encoding before the ingest resize
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
HELD_OUT_FILE = "held_out.txt"


def class_name(pair: tuple[str, str]) -> str:
    """``("red", "circle")`` -> ``"red circle"``."""
    return " ".join(pair)


def write_class_files(folder: str | os.PathLike) -> None:
    """``classnames.txt``, the prompt templates and ``held_out.txt``, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    templates = [t.replace("{colour} {shape}", "{c}") for t in scenes.PROMPT_TEMPLATES]
    for name, lines in (
        (CLASSNAMES_FILE, [class_name(pair) for pair in scenes.CLASSES]),
        (TEMPLATES_FILE, templates),
        (HELD_OUT_FILE, [class_name(pair) for pair in scenes.UNSEEN_CLASSES]),
    ):
        (folder / name).write_text("".join(f"{line}\n" for line in lines))


@dataclass(frozen=True)
class EvalSample:
    index: int
    image: bytes
    caption: str
    label: dict


def make_sample(index: int, per_class: int, seed: int, image_size: int, resize_mode: str) -> EvalSample:
    """Sample ``index``: class ``index // per_class``, drawn from its own seed."""
    class_index = index // per_class
    pair = scenes.CLASSES[class_index]
    rng = random.Random(f"eval:{seed}:{index}")
    scene = scenes.sample_scene(rng, pair, allow_held_out=True)
    buffer = io.BytesIO()
    scenes.render(scene).save(buffer, format="JPEG", quality=SOURCE_JPEG_QUALITY)
    resized = resize_image(buffer.getvalue(), ResizeConfig(image_size=image_size, resize_mode=resize_mode))
    label = {
        "colour": scene.colour,
        "shape": scene.shape,
        "class_index": class_index,
        "seen": pair not in scenes.HELD_OUT_PAIRS,
    }
    return EvalSample(index, resized.data, scenes.caption(scene, rng), label)


def write_evalset(
    path: str | os.PathLike,
    per_class: int,
    seed: int = 0,
    image_size: int = 128,
    resize_mode: str = "border",
    *,
    workers: int | None = None,
    progress: bool = True,
) -> int:
    """Write the tar (atomically: readers never see half of it) and the class files beside it; returns the count."""
    if per_class < 1:
        raise ValueError(f"per_class={per_class}: must be at least 1")
    ResizeConfig(image_size=image_size, resize_mode=resize_mode)  # checks both, with a clear message
    total = per_class * len(scenes.CLASSES)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_path = target.with_name(f".{target.name}.partial")
    make = partial(make_sample, per_class=per_class, seed=seed, image_size=image_size, resize_mode=resize_mode)
    workers = workers or os.cpu_count() or 1
    with TarWriter(partial_path) as tar, tqdm(
        total=total, desc="rendering evalset", unit="image", disable=not progress
    ) as bar:

        def add(sample: EvalSample) -> None:
            key = f"{sample.index:06d}"
            tar.add(f"{key}.jpg", sample.image)
            tar.add(f"{key}.txt", sample.caption.encode())
            tar.add(f"{key}.json", json.dumps(sample.label, sort_keys=True).encode())
            bar.update()

        if workers <= 1:
            for sample in map(make, range(total)):
                add(sample)
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for sample in pool.imap(make, range(total), chunksize=8):  # in order: deterministic tar
                    add(sample)
    write_class_files(target.parent)
    os.replace(partial_path, target)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.evalset",
        description="Write the zero-shot evaluation set of the scene world (all 48 colour/shape "
        "classes, held-out pairs included) as a WebDataset tar.",
    )
    parser.add_argument("--out", required=True, help="output .tar path")
    parser.add_argument("--per-class", type=int, required=True, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="eval seed; its stream never meets the corpus's (default 0)")
    parser.add_argument("--image-size", type=int, default=128, help="side after the ingest resize (default 128)")
    parser.add_argument(
        "--resize-mode", default="border", choices=RESIZE_MODES, help="ingest resize mode (default %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        count = write_evalset(args.out, args.per_class, args.seed, args.image_size, args.resize_mode,
                              workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} samples ({len(scenes.CLASSES)} classes x {args.per_class}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
