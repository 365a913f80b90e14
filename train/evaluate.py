"""Evaluation during and after training: zero-shot classification and image-text retrieval.

Every rank takes part and does a share of the work: rank ``r`` scores its contiguous
slice of the zero-shot images and embeds its readers' part of the retrieval shards;
the results are gathered to every rank and the metrics computed from the whole. No
rank sits at a barrier while another evaluates alone (a long evaluation would hit the
process group's timeout), and the figures are the same whatever the world size.

Retrieval: each held-out sample is one image and its caption; recall@k is the share of
images whose own caption is among the k most similar captions (image->text), and the
share of captions whose own image is among the k most similar images (text->image)
(``apply.benchmark.recall_at_k``, the figures of ``python -m apply.evaluate`` too).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch

from apply.benchmark import recall_at_k  # one implementation, shared with apply.evaluate
from train import data as data_mod
from train import distributed, zeroshot
from train import model as model_mod


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate, loaded once at start (every rank holds the zero-shot images)."""

    zeroshot_set: zeroshot.EvalSet | None
    classes: zeroshot.Classes | None
    retrieval_shards: list[data_mod.Shard] | None
    max_samples: int
    batch_size: int


@dataclass
class Evaluation:
    zeroshot: zeroshot.TopKResult | None
    scores: torch.Tensor | None  # (N, classes): every zero-shot image against every class, in image order
    retrieval: dict | None

    def record(self, step: int) -> dict:
        """The log record of this evaluation."""
        record: dict = {"step": step}
        if self.zeroshot is not None:
            record["zeroshot"] = self.zeroshot.figures()
        if self.retrieval is not None:
            record["retrieval"] = self.retrieval
        return record

    def lines(self) -> list[str]:
        """What the trainer prints at the end; the zero-shot summary last."""
        lines = [retrieval_line(self.retrieval)] if self.retrieval is not None else []
        if self.zeroshot is not None:
            lines += [self.zeroshot.details(), self.zeroshot.line()]
        return lines


def plan(config, image_size: int) -> EvalPlan | None:
    """Read class names, templates and the zero-shot images named by ``config.data``; None if nothing to do."""
    d = config.data
    if not d.eval_tar and not d.eval_shards:
        return None
    zeroshot_set, classes = None, None
    if d.eval_tar:
        classes = zeroshot.find_classes(d.eval_tar, d.eval_classnames, d.eval_templates)
        zeroshot_set = zeroshot.load_eval_set(d.eval_tar, image_size, len(classes.names))
    shards = data_mod.list_shards(d.eval_shards) if d.eval_shards else None
    return EvalPlan(zeroshot_set, classes, shards, d.eval_max_samples, config.eval_batch_size)


@torch.no_grad()
def run(model, tokenizer, eval_plan: EvalPlan, world, autocast=contextlib.nullcontext()) -> Evaluation:
    """All ranks call this together; every rank gets the whole result."""
    was_training = model.training
    model.eval()
    try:
        with autocast:
            result, scores = None, None
            if eval_plan.zeroshot_set is not None:
                result, scores = _zeroshot(model, tokenizer, eval_plan, world)
            retrieval = _retrieval(model, tokenizer, eval_plan, world) if eval_plan.retrieval_shards else None
    finally:
        model.train(was_training)
    return Evaluation(result, scores, retrieval)


def _zeroshot(model, tokenizer, eval_plan: EvalPlan, world):
    eval_set = eval_plan.zeroshot_set
    classifier = zeroshot.class_embeddings(zeroshot.text_encoder(model, tokenizer, world.device),
                                          eval_plan.classes.prompts())
    n = len(eval_set.images)
    lo, hi = n * world.rank // world.world_size, n * (world.rank + 1) // world.world_size
    mine = zeroshot.score_images(model, eval_set.images[lo:hi], classifier, world.device, eval_plan.batch_size)
    scores = torch.cat(distributed.all_gather_objects(mine, world))  # rank order = image order
    return zeroshot.topk_metrics(scores, eval_set.labels), scores


def _retrieval(model, tokenizer, eval_plan: EvalPlan, world) -> dict:
    stream = data_mod.ShardStream(
        eval_plan.retrieval_shards,
        batch_size=eval_plan.batch_size,
        image_size=model_mod.image_size_of(model),
        tokenize=tokenizer,
        rank=world.rank,
        world_size=world.world_size,
        shuffle_buffer=1,  # no shuffling: the same held-out samples every time
        repeat=False,
    )
    limit = max(1, eval_plan.max_samples // world.world_size)
    mean, std = model_mod.normaliser(model, world.device)
    image_rows, text_rows, skipped, taken = [], [], Counter(), 0
    for batch in stream:
        skipped.update(batch.skipped)
        if not batch.keys:
            continue  # every sample of this batch was skipped (counted above)
        images = model_mod.normalise(batch.images[: limit - taken].to(world.device), mean, std)
        texts = batch.texts[: limit - taken].to(world.device)
        image_rows.append(model.encode_image(images, normalize=True).float().cpu())
        text_rows.append(model.encode_text(texts, normalize=True).float().cpu())
        taken += len(images)
        if taken >= limit:
            break
    gathered = distributed.all_gather_objects((image_rows, text_rows, dict(skipped)), world)
    image_features = torch.cat([row for rank_rows, _, _ in gathered for row in rank_rows] or [torch.empty(0, 1)])
    text_features = torch.cat([row for _, rank_rows, _ in gathered for row in rank_rows] or [torch.empty(0, 1)])
    total_skipped: Counter = Counter()
    for _, _, counts in gathered:
        total_skipped.update(counts)
    figures = recall_at_k(image_features, text_features)
    return {**figures, "n": len(image_features), "skipped": dict(total_skipped)}


def retrieval_line(figures: dict) -> str:
    def f(key: str) -> str:
        return "n/a" if figures.get(key) is None else f"{figures[key]:.2f}"

    return (
        f"retrieval R@1/5/10: image->text {f('image_to_text_R@1')}/{f('image_to_text_R@5')}/"
        f"{f('image_to_text_R@10')}, text->image {f('text_to_image_R@1')}/{f('text_to_image_R@5')}/"
        f"{f('text_to_image_R@10')} (n={figures['n']})"
    )
