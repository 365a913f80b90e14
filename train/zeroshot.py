"""Zero-shot classification, CLIP_benchmark style: class names and prompt templates in, top-1 / top-5 out.

The eval set is a WebDataset tar (or a folder of ``*.tar``) whose samples hold an image
and a label: ``{key}.cls`` (an integer, the WebDataset convention) or ``label`` /
``class_index`` in ``{key}.json``; a sample without a usable label is skipped and
counted (``label_missing``).

Class names, one per line, come from ``data.eval_classnames`` or else ``classnames.txt``;
prompt templates, one per line with ``{c}`` or ``{}`` standing for the class name, from
``data.eval_templates`` or else ``zeroshot_classification_templates.txt``, else
``a photo of a {c}.``. The files are looked for beside the eval tar and in its parent
folder: CLIP_benchmark's layout, ``{root}/classnames.txt`` beside ``{root}/{split}/{n}.tar``.

The classifier is text only: per class, the normalised mean of its normalised prompt
embeddings; every image is scored against every class. Reported: top-1, top-5 and the
mean per-class recall (``TopKResult``); the per-image scores can be written for finer
analyses (``write_scores``).

    python -m train.zeroshot --checkpoint RUN/checkpoints/step_00001000.pt --model webclip-tiny \\
        --eval EVAL/test/0.tar [--classnames FILE] [--templates FILE] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from core import storage
from core.config import ConfigError
from core.device import prepare as prepare_device
from core.reasons import Reason
from train import checkpoint as ckpt
from train import data as data_mod
from train import model as model_mod

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
MAX_SCORES = 1 << 25  # write_scores writes at most this many image x class scores (128 MiB)


@dataclass
class EvalSet:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,), index into the class names
    keys: list[str]
    skipped: dict[str, int]


@dataclass(frozen=True)
class Classes:
    """What the classifier is built from."""

    names: list[str]
    templates: list[str]

    def prompts(self) -> list[list[str]]:
        """Per class, its prompts: each template with ``{c}`` (or ``{}``) replaced by the class name."""
        return [[t.replace("{c}", name).replace("{}", name) for t in self.templates] for name in self.names]


@dataclass
class TopKResult:
    top1: float | None
    top5: float | None
    mean_per_class_recall: float | None  # top-1 averaged over the classes that have images
    n: int
    classes: int
    per_class_top1: list[float | None] = field(default_factory=list)  # None: no image of that class

    def details(self) -> str:
        return f"zero-shot: {self.n} images, {self.classes} classes"

    def line(self) -> str:
        """The one-line summary the trainer prints last."""
        return f"zero-shot top1={_rate(self.top1)} top5={_rate(self.top5)} ({self.classes} classes)"

    def figures(self) -> dict:
        """The scalar figures (for a log record)."""
        return {k: v for k, v in asdict(self).items() if k != "per_class_top1" and v is not None}


def _rate(value: float | None) -> str:
    # Rounded as zeroshot.json stores it first, so a line printed from the live result
    # and one printed from the file agree (0.22499 and 0.225 would not).
    return "n/a" if value is None else f"{round(value, 4):.2f}"


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


# -- class names and templates ----------------------------------------------------------


def read_lines(path: str) -> list[str]:
    """Non-empty, stripped lines of a text file (local or ``s3://``)."""
    with storage.open_file(path, "r") as handle:
        return [line.strip() for line in handle if line.strip()]


def _folders_of(eval_path: str) -> list[str]:
    """The eval set's folder (the tar's, or the folder itself) and that folder's parent."""
    fs, fs_path = storage.filesystem(eval_path)
    fs_path = fs_path.rstrip("/") or "/"
    folder = fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path)
    parent = posixpath.dirname(folder)
    folders = [folder] + ([parent] if parent and parent != folder else [])
    return folders if storage.is_local(eval_path) else [fs.unstrip_protocol(f) for f in folders]


def find_beside(eval_path: str, name: str) -> str | None:
    """File ``name`` beside the eval set or in its parent folder (CLIP_benchmark's layout), or None."""
    for folder in _folders_of(eval_path):
        candidate = posixpath.join(folder, name)
        if storage.exists(candidate):
            return candidate
    return None


def find_classes(eval_path: str, classnames: str | None = None, templates: str | None = None) -> Classes:
    """Class names and templates from the given files, else from those beside the eval set.

    Raises ``ConfigError`` when there are no class names.
    """
    classnames = classnames or find_beside(eval_path, CLASSNAMES_FILE)
    if classnames is None:
        raise ConfigError(
            f"data.eval_tar={eval_path!r}: no class names; give data.eval_classnames (one per line) or put "
            f"{CLASSNAMES_FILE} beside the tar or in its parent folder (CLIP_benchmark's layout)"
        )
    names = read_lines(classnames)
    if not names:
        raise ConfigError(f"{classnames}: no class names in it")
    templates = templates or find_beside(eval_path, TEMPLATES_FILE)
    return Classes(names, read_lines(templates) if templates else list(DEFAULT_TEMPLATES))


# -- the labelled images ------------------------------------------------------------------


def eval_tars(path: str) -> list[str]:
    """The tar itself (compressed ones too), or every ``*.tar`` of a folder in name order."""
    fs, fs_path = storage.filesystem(path)
    return storage.list_files(path, ".tar") if fs.isdir(fs_path) else [path]


def _label(sample: data_mod.RawSample, num_classes: int) -> int:
    """The class index of a sample from ``.cls`` or ``.json``; ValueError if none is usable."""
    if "cls" in sample.members:
        label = int(sample.members["cls"].decode("utf-8").strip())
    else:
        meta = json.loads(sample.members["json"].decode("utf-8"))
        label = meta["label"] if "label" in meta else meta["class_index"]
    if not isinstance(label, int) or not 0 <= label < num_classes:
        raise ValueError(f"label {label!r} outside 0..{num_classes - 1}")
    return label


def load_eval_set(path: str, image_size: int, num_classes: int) -> EvalSet:
    """Read the labelled images of an eval tar (or folder of tars), decoded at ``image_size``."""
    skipped: Counter = Counter()
    images, labels, keys = [], [], []
    for tar in eval_tars(path):
        for sample in data_mod.iter_tar_samples(tar, skipped):
            try:
                image = data_mod.decode_image(data_mod.image_bytes(sample.members), image_size)
            except data_mod.SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            try:
                labels.append(_label(sample, num_classes))
            except (KeyError, ValueError, TypeError, UnicodeDecodeError):
                skipped[Reason.LABEL_MISSING.value] += 1
                continue
            images.append(image)
            keys.append(sample.key)
    if not images:
        raise ValueError(f"{path}: no usable eval samples (skipped: {dict(skipped)})")
    return EvalSet(torch.stack(images), torch.tensor(labels), keys, dict(skipped))


# -- scoring --------------------------------------------------------------------------------


@torch.no_grad()
def class_embeddings(model: torch.nn.Module, tokenizer, device: torch.device, prompts: list[list[str]]) -> torch.Tensor:
    """(classes, D): per class, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for class_prompts in prompts:
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


def topk_metrics(scores: torch.Tensor, labels: torch.Tensor) -> TopKResult:
    """Top-1, top-5 and per-class top-1 from similarities; pure."""
    n, classes = scores.shape
    if n == 0:
        return TopKResult(None, None, None, 0, classes, [None] * classes)
    top = scores.topk(min(5, classes), dim=1).indices
    hits = top == labels[:, None]
    top1 = hits[:, 0].float()
    per_class = [
        float(top1[labels == c].mean()) if bool((labels == c).any()) else None for c in range(classes)
    ]
    present = [v for v in per_class if v is not None]
    return TopKResult(
        float(top1.mean()), float(hits.any(dim=1).float().mean()), sum(present) / len(present), n, classes, per_class
    )


# -- results ----------------------------------------------------------------------------------


def write_result(path: str, result: TopKResult, extra: dict | None = None) -> None:
    payload = {k: _round(v) for k, v in asdict(result).items()}
    storage.write_json(path, {**payload, **(extra or {})})


def write_scores(path: str, scores: torch.Tensor, eval_set: EvalSet, classes: Classes) -> bool:
    """Per-image scores as ``.npz``: ``scores`` (N, C) float32, ``labels``, ``keys``, ``classnames``.

    Skipped (False) above ``MAX_SCORES`` scores.
    """
    if scores.numel() > MAX_SCORES:
        return False
    buffer = _npz(scores=scores.float().numpy(), labels=eval_set.labels.numpy(),
                  keys=np.array(eval_set.keys, dtype=str), classnames=np.array(classes.names, dtype=str))  # fmt: skip
    with storage.atomic_write(path, "wb") as handle:
        handle.write(buffer)
    return True


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def evaluate(model, tokenizer, eval_set: EvalSet, classes: Classes, device: torch.device,
             batch_size: int = 256) -> tuple[TopKResult, torch.Tensor]:  # fmt: skip
    """(figures, per-image scores) of ``model`` on ``eval_set``."""
    was_training = model.training
    model.eval()
    try:
        classifier = class_embeddings(model, tokenizer, device, classes.prompts())
        scores = score_images(model, eval_set.images, classifier, device, batch_size)
    finally:
        model.train(was_training)
    return topk_metrics(scores, eval_set.labels), scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.zeroshot", description="Zero-shot top-1 / top-5 of a checkpoint on a labelled eval set."
    )
    parser.add_argument("--checkpoint", required=True, help="model .pt file or checkpoint folder, local or s3://")
    parser.add_argument("--model", help="open_clip model name (default: the one the checkpoint names)")
    parser.add_argument("--model-config", help="extra open_clip model JSON to register first")
    parser.add_argument("--eval", required=True, help="eval tar (or folder of tars), local or s3://")
    parser.add_argument("--classnames", help=f"class names, one per line (default: {CLASSNAMES_FILE} beside --eval)")
    parser.add_argument("--templates", help=f"prompt templates, one per line (default: {TEMPLATES_FILE} beside --eval)")
    parser.add_argument("--out", help="write all figures as JSON here")
    parser.add_argument("--scores", help="write the per-image scores (.npz) here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 autocast on GPU, as in training), fp32, "
                        "bf16 or fp16 (default: auto)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.model_config:
        model_mod.register_model_config(args.model_config)
    if args.model and args.model not in model_mod.model_names():
        parser.error(f"--model {args.model}: unknown; known: webclip-*, or pass --model-config FILE")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be a positive integer")
    if not storage.exists(args.eval):
        parser.error(f"--eval {args.eval}: no such file")
    try:
        compute = prepare_device(args.device, args.precision)
        classes = find_classes(args.eval, args.classnames, args.templates)
        loaded = ckpt.load_model(args.checkpoint, name=args.model, device=compute.device)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    eval_set = load_eval_set(args.eval, loaded.image_size, len(classes.names))
    with compute.autocast():
        result, scores = evaluate(loaded.model, loaded.tokenizer, eval_set, classes, compute.device, args.batch_size)
    if args.out:
        write_result(args.out, result, {"checkpoint": loaded.path, "eval": args.eval, "skipped": eval_set.skipped})
    if args.scores:
        write_scores(args.scores, scores, eval_set, classes)
    print(result.details())
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
