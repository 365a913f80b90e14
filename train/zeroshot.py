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
analyses (``write_scores``). The sets, the classifier and the figures are
``apply.benchmark``'s, the same code as ``python -m apply.evaluate``; this module runs
them on the trainer's model and writes the trainer's results.

    python -m train.zeroshot --checkpoint RUN/checkpoints/step_00001000.pt --model webclip-tiny \\
        --eval EVAL/test/0.tar [--classnames FILE] [--templates FILE] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import asdict

import numpy as np
import torch

from apply.benchmark import (  # noqa: F401 - the trainer's zero-shot interface: train.zeroshot.X
    CLASSNAMES_FILE, TEMPLATES_FILE, Classes, EvalSet, TopKResult, class_embeddings, find_classes,
    load_eval_set, topk_metrics,
)
from core import storage
from core.config import ConfigError
from core.device import prepare as prepare_device
from train import checkpoint as ckpt
from train import model as model_mod

MAX_SCORES = 1 << 25  # write_scores writes at most this many image x class scores (128 MiB)


# -- scoring --------------------------------------------------------------------------------


def text_encoder(model: torch.nn.Module, tokenizer, device: torch.device):
    """Texts -> normalised (B, D) embeddings of ``model``, for ``class_embeddings``."""
    return lambda texts: model.encode_text(tokenizer(texts).to(device), normalize=True).float()


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


# -- results ----------------------------------------------------------------------------------


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


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
        classifier = class_embeddings(text_encoder(model, tokenizer, device), classes.prompts())
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
