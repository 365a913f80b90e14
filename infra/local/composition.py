"""The demo's zero-shot figures: does the model put together a colour and a shape it never saw together?

Computed from the trainer's per-image class scores (``{run_dir}/zeroshot_scores.npz``,
``train.zeroshot.write_scores``) and the eval set's ``classnames.txt`` ("colour shape")
and ``held_out.txt`` (``infra/local/evalset.py`` writes both beside ``eval.tar``). With
chance = 1 / classes:

* ``seen``        top-1 on images of classes that occur in training;
* ``unseen``      top-1 on images of the held-out classes, among all classes (the model
                  must put a colour and a shape together it never saw);
* ``unseen_only`` top-1 on held-out images among the held-out classes only;
* colour and shape accuracy of the top-1 prediction, for seen and unseen images, to tell
  "wrong colour" from "wrong shape".

    python -m infra.local.composition --run runs/demo --eval data/demo/eval [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

from infra.local.evalset import CLASSNAMES_FILE, HELD_OUT_FILE

SCORES_FILE = "zeroshot_scores.npz"  # in the run folder (train/loop.py)
RESULT_FILE = "composition.json"  # what the demo writes beside it


@dataclass
class ZeroShotResult:
    seen: float | None
    unseen: float | None
    unseen_only: float | None
    seen_colour: float | None
    seen_shape: float | None
    unseen_colour: float | None
    unseen_shape: float | None
    n_seen: int
    n_unseen: int
    chance: float
    classes: int

    def details(self) -> str:
        """Colour / shape accuracy and sample counts, printed before the summary line."""
        f = _rate
        return (
            f"zero-shot colour/shape: seen {f(self.seen_colour)}/{f(self.seen_shape)} (n={self.n_seen}), "
            f"unseen {f(self.unseen_colour)}/{f(self.unseen_shape)} (n={self.n_unseen})"
        )

    def line(self) -> str:
        """The demo's last line."""
        f = _rate
        return (
            f"zero-shot top1: seen={f(self.seen)} unseen={f(self.unseen)} unseen_only={f(self.unseen_only)} "
            f"chance={self.chance:.3f} ({self.classes} classes)"
        )

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _rate(value: float | None) -> str:
    # Rounded as the JSON stores it first, so a line printed live and one from the file agree.
    return "n/a" if value is None else f"{round(value, 4):.2f}"


def metrics(scores: np.ndarray, labels: np.ndarray, classnames: list[str], held_out: list[str]) -> ZeroShotResult:
    """The figures from (N, classes) similarities and labels; class names are "colour shape". Pure."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    unknown = sorted(set(held_out) - set(classnames))
    if unknown:
        raise ValueError(f"held-out classes {unknown} are not among the class names")
    pairs = [name.split(" ", 1) for name in classnames]
    colours = np.array([colour for colour, _ in pairs])
    shapes = np.array([shape for _, shape in pairs])
    unseen_idx = np.array([classnames.index(name) for name in held_out], dtype=np.int64)
    predicted = scores.argmax(axis=1)
    seen = ~np.isin(labels, unseen_idx)
    unseen = ~seen
    correct = predicted == labels
    colour_ok = colours[predicted] == colours[labels]
    shape_ok = shapes[predicted] == shapes[labels]
    only_pred = unseen_idx[scores[:, unseen_idx].argmax(axis=1)] if len(unseen_idx) else predicted

    def rate(hit: np.ndarray, mask: np.ndarray) -> float | None:
        n = int(mask.sum())
        return None if n == 0 else float(hit[mask].mean())

    return ZeroShotResult(
        seen=rate(correct, seen),
        unseen=rate(correct, unseen),
        unseen_only=rate(only_pred == labels, unseen),
        seen_colour=rate(colour_ok, seen),
        seen_shape=rate(shape_ok, seen),
        unseen_colour=rate(colour_ok, unseen),
        unseen_shape=rate(shape_ok, unseen),
        n_seen=int(seen.sum()),
        n_unseen=int(unseen.sum()),
        chance=1.0 / len(classnames),
        classes=len(classnames),
    )


def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def figures(run_dir: str, eval_folder: str) -> ZeroShotResult:
    """The figures of the run in ``run_dir`` on the eval set in ``eval_folder``."""
    with np.load(os.path.join(run_dir, SCORES_FILE), allow_pickle=False) as saved:
        scores, labels, classnames = saved["scores"], saved["labels"], [str(c) for c in saved["classnames"]]
    if classnames != _lines(os.path.join(eval_folder, CLASSNAMES_FILE)):
        raise ValueError(f"{run_dir}/{SCORES_FILE}: its classes are not those of {eval_folder}/{CLASSNAMES_FILE}")
    return metrics(scores, labels, classnames, _lines(os.path.join(eval_folder, HELD_OUT_FILE)))


def write(path: str, result: ZeroShotResult) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result.as_dict(), handle, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.composition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--run", required=True, help=f"the training run's folder (holding {SCORES_FILE})")
    parser.add_argument("--eval", required=True, help=f"the eval set's folder (holding {CLASSNAMES_FILE}, {HELD_OUT_FILE})")
    parser.add_argument("--out", help=f"write the figures as JSON here (default: {RESULT_FILE} in --run)")
    args = parser.parse_args(argv)
    try:
        result = figures(args.run, args.eval)
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write(args.out or os.path.join(args.run, RESULT_FILE), result)
    print(result.details())
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
