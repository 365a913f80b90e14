"""Zero-shot classification: the demo world's 48 classes by default, or any classes from files.

The classifier is text only: for each class, the embeddings of its prompts averaged
and re-normalised; images are scored against every class.

**Classes from files** (``data.eval_classnames``: one class name per line;
``data.eval_templates``: one prompt per line, ``{}`` standing for the class name): the
eval tar's samples carry their label as ``{key}.cls`` (an integer, the WebDataset
convention) or as ``label`` / ``class_index`` in ``{key}.json``; reported are top-1 and
top-5 accuracy (``TopKResult``).

**The demo world** (no class-name file): does the model read colour *and* shape? The
prompts are ``scenes.prompts(colour, shape)`` (or the template file's, with
``"{colour} {shape}"`` as the class name). Reported, with chance = 1/48:

* ``seen``        top-1 on images of pairs that occur in training;
* ``unseen``      top-1 on images of the held-out pairs, among all 48 classes
                  (the model must put a colour and a shape together it never saw);
* ``unseen_only`` top-1 on held-out images among the 6 held-out classes only;
* colour and shape accuracy of the top-1 prediction, for seen and unseen images, to
  tell "wrong colour" from "wrong shape".

Standalone::

    python -m train.zeroshot --checkpoint runs/demo/checkpoints/step_00001000.pt \\
        --model webclip-tiny --eval data/demo/eval/eval.tar [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from core import storage
from core.reasons import Reason
from infra.local import scenes
from train import data as data_mod
from train import model as model_mod

NUM_CLASSES = len(scenes.CLASSES)
CHANCE = 1.0 / NUM_CLASSES
UNSEEN_CLASS_INDICES = [i for i, pair in enumerate(scenes.CLASSES) if pair in scenes.HELD_OUT_PAIRS]


@dataclass
class EvalSet:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,), index into scenes.CLASSES
    seen: torch.Tensor  # bool (N,)
    skipped: dict[str, int]


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
    chance: float = CHANCE
    classes: int = NUM_CLASSES

    def details(self) -> str:
        """Colour / shape accuracy and sample counts, printed before the summary line."""
        f = _rate
        return (
            f"zero-shot colour/shape: seen {f(self.seen_colour)}/{f(self.seen_shape)} (n={self.n_seen}), "
            f"unseen {f(self.unseen_colour)}/{f(self.unseen_shape)} (n={self.n_unseen})"
        )

    def line(self) -> str:
        """The one-line summary the trainer prints last."""
        f = _rate
        return (
            f"zero-shot top1: seen={f(self.seen)} unseen={f(self.unseen)} unseen_only={f(self.unseen_only)} "
            f"chance={self.chance:.3f} ({self.classes} classes)"
        )


def _rate(value: float | None) -> str:
    # Rounded as zeroshot.json stores it first, so a line printed from the live result
    # and one printed from the file agree (0.22499 and 0.225 would not).
    return "n/a" if value is None else f"{round(value, 4):.2f}"


@dataclass
class TopKResult:
    """Zero-shot accuracy over classes from files."""

    top1: float | None
    top5: float | None
    n: int
    classes: int

    def details(self) -> str:
        return f"zero-shot: {self.n} images, {self.classes} classes"

    def line(self) -> str:
        return f"zero-shot top1={_rate(self.top1)} top5={_rate(self.top5)} ({self.classes} classes)"


def read_lines(path: str) -> list[str]:
    """Non-empty, stripped lines of a text file (local or ``s3://``)."""
    with storage.open_file(path, "r") as handle:
        return [line.strip() for line in handle if line.strip()]


def file_prompts(classnames: list[str], templates: list[str] | None) -> list[list[str]]:
    """Per class, its prompts: each template with ``{}`` replaced by the class name."""
    templates = templates or ["a photo of a {}."]
    return [[t.replace("{}", name) for t in templates] for name in classnames]


def demo_prompts(templates: list[str] | None = None) -> list[list[str]]:
    """Per demo class, in ``scenes.CLASSES`` order: the demo's own prompts, or the templates'."""
    if templates is None:
        return [scenes.prompts(colour, shape) for colour, shape in scenes.CLASSES]
    return file_prompts([f"{colour} {shape}" for colour, shape in scenes.CLASSES], templates)


def _file_label(sample: data_mod.RawSample, num_classes: int) -> int:
    """The class index of a sample from ``.cls`` or ``.json``; ValueError if none is usable."""
    if "cls" in sample.members:
        label = int(sample.members["cls"].decode("utf-8").strip())
    else:
        meta = json.loads(sample.members["json"].decode("utf-8"))
        label = meta["label"] if "label" in meta else meta["class_index"]
    if not isinstance(label, int) or not 0 <= label < num_classes:
        raise ValueError(f"label {label!r} outside 0..{num_classes - 1}")
    return label


def load_eval_set(path: str, image_size: int, num_classes: int | None = None) -> EvalSet:
    """Read a labelled eval tar; ``num_classes=None`` means the demo world's layout.

    Demo layout: ``{i}.jpg`` plus ``{i}.json`` with colour, shape, class_index, seen. The
    label is taken from (colour, shape), and a ``class_index`` that disagrees with
    ``scenes.CLASSES`` is an error: a silently shifted label would fake any accuracy.
    With ``num_classes`` the label comes from ``.cls`` / ``.json`` (see the module doc)
    and every sample counts as "seen".
    """
    skipped: Counter = Counter()
    images, labels, seen = [], [], []
    for sample in data_mod.iter_tar_samples(path, skipped):
        try:
            image = data_mod.decode_image(data_mod.image_bytes(sample.members), image_size)
        except data_mod.SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        if num_classes is not None:
            try:
                labels.append(_file_label(sample, num_classes))
            except (KeyError, ValueError, TypeError, UnicodeDecodeError):
                skipped[Reason.LABEL_MISSING.value] += 1
                continue
            images.append(image)
            seen.append(True)
            continue
        try:
            meta = json.loads(sample.members["json"].decode("utf-8"))
            pair = (meta["colour"], meta["shape"])
        except (KeyError, ValueError, TypeError):
            skipped[Reason.LABEL_MISSING.value] += 1
            continue
        if pair not in scenes.CLASSES:
            skipped[Reason.LABEL_MISSING.value] += 1
            continue
        label = scenes.CLASSES.index(pair)
        if "class_index" in meta and meta["class_index"] != label:
            raise ValueError(
                f"{path}: sample {sample.key} says class_index={meta['class_index']} but {pair} is "
                f"class {label} in scenes.CLASSES; the eval set and the code disagree"
            )
        images.append(image)
        labels.append(label)
        seen.append(pair not in scenes.HELD_OUT_PAIRS)
    if not images:
        raise ValueError(f"{path}: no usable eval samples (skipped: {dict(skipped)})")
    return EvalSet(torch.stack(images), torch.tensor(labels), torch.tensor(seen), dict(skipped))


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module, tokenizer, device: torch.device, prompts: list[list[str]] | None = None
) -> torch.Tensor:
    """(classes, D): per class, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for class_prompts in prompts if prompts is not None else demo_prompts():
        tokens = tokenizer(class_prompts).to(device)
        features = model.encode_text(tokens, normalize=True).float()
        rows.append(torch.nn.functional.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def score_images(
    model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(N, classes) similarities of uint8 ``images`` to the classifier's rows (model in eval mode)."""
    mean, std = model_mod.normaliser(model, device)
    scores = [torch.empty((0, classifier.shape[0]))]
    for start in range(0, len(images), batch_size):
        batch = model_mod.normalise(images[start : start + batch_size].to(device), mean, std)
        features = model.encode_image(batch, normalize=True).float()
        scores.append((features @ classifier.T).cpu())
    return torch.cat(scores)


@torch.no_grad()
def predict(model: torch.nn.Module, tokenizer, eval_set: EvalSet, device: torch.device, batch_size: int = 256):
    """(N, 48) image-to-class similarities."""
    was_training = model.training
    model.eval()
    classifier = class_embeddings(model, tokenizer, device)
    scores = score_images(model, eval_set.images, classifier, device, batch_size)
    model.train(was_training)
    return scores


def topk_metrics(scores: torch.Tensor, labels: torch.Tensor) -> TopKResult:
    """Top-1 and top-5 accuracy from similarities; pure."""
    n, classes = scores.shape
    if n == 0:
        return TopKResult(None, None, 0, classes)
    top = scores.topk(min(5, classes), dim=1).indices
    hits = top == labels[:, None]
    return TopKResult(float(hits[:, 0].float().mean()), float(hits.any(dim=1).float().mean()), n, classes)


def metrics(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor) -> ZeroShotResult:
    """Accuracies from similarities; pure, so it is tested without a model."""
    predicted = scores.argmax(dim=1)
    colours = torch.tensor([list(scenes.COLOURS).index(c) for c, _ in scenes.CLASSES])
    shapes = torch.tensor([scenes.SHAPES.index(s) for _, s in scenes.CLASSES])
    correct = predicted == labels
    colour_ok = colours[predicted] == colours[labels]
    shape_ok = shapes[predicted] == shapes[labels]
    unseen = ~seen
    unseen_idx = torch.tensor(UNSEEN_CLASS_INDICES)
    only_pred = unseen_idx[scores[:, unseen_idx].argmax(dim=1)]

    def rate(hit: torch.Tensor, mask: torch.Tensor) -> float | None:
        n = int(mask.sum())
        return None if n == 0 else float(hit[mask].float().mean())

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
    )


def evaluate(model, tokenizer, eval_set: EvalSet, device: torch.device, batch_size: int = 256) -> ZeroShotResult:
    return metrics(predict(model, tokenizer, eval_set, device, batch_size), eval_set.labels, eval_set.seen)


def write_result(path: str, result: ZeroShotResult, extra: dict | None = None) -> None:
    payload = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(result).items()}
    storage.write_json(path, {**payload, **(extra or {})})


def _local_copy(path: str, folder: str) -> str:
    """open_clip loads only local files: copy an ``s3://`` checkpoint to ``folder`` first."""
    if storage.is_local(path):
        return path
    target = os.path.join(folder, os.path.basename(path))
    with storage.open_file(path, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.zeroshot", description="Zero-shot top-1 of a checkpoint on the 48-class eval set."
    )
    parser.add_argument("--checkpoint", required=True, help="model .pt file, local or s3://")
    parser.add_argument("--model", default="webclip-tiny", help="open_clip model name (default: webclip-tiny)")
    parser.add_argument("--model-config", help="extra open_clip model JSON to register first")
    parser.add_argument("--eval", required=True, help="eval tar, local or s3://")
    parser.add_argument("--out", help="write all figures as JSON here")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.model_config:
        model_mod.register_model_config(args.model_config)
    if args.model not in model_mod.model_names():
        parser.error(f"--model {args.model}: unknown; known: webclip-*, or pass --model-config FILE")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be a positive integer")
    for flag, path in (("--checkpoint", args.checkpoint), ("--eval", args.eval)):
        if not storage.exists(path):
            parser.error(f"{flag} {path}: no such file")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(args.checkpoint, tmp)
        saved = torch.load(local, map_location="cpu", weights_only=True)
        image_size = saved.get("image_size") if isinstance(saved, dict) else None  # set by our trainer
        del saved
        model = model_mod.create_model(args.model, pretrained=local, image_size=image_size, device=device)
    tokenizer = model_mod.tokenizer_for(args.model)
    eval_set = load_eval_set(args.eval, model_mod.image_size_of(model))
    result = evaluate(model, tokenizer, eval_set, device, args.batch_size)
    if args.out:
        write_result(args.out, result, {"checkpoint": args.checkpoint, "eval": args.eval, "skipped": eval_set.skipped})
    print(result.details())
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
