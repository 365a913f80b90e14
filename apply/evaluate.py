"""Benchmark evaluation, CLIP_benchmark's way: ``python -m apply.evaluate`` (``make eval``).

Each of ``--datasets`` (local or ``s3://``) is

* in CLIP_benchmark's WebDataset layout: ``{root}/{split}/*.tar`` with image, ``.cls`` and/or
  ``.txt`` (captions, one per line) members, ``{root}/classnames.txt`` and optionally
  ``{root}/zeroshot_classification_templates.txt`` (else ``a photo of a {c}.``); or
* an ImageFolder: ``{root}/{split}/{class}/*.jpg`` or ``{root}/{class}/*.jpg``, the folder
  names (sorted) being the class names, with the same optional templates file in ``{root}``.

Tasks: ``zeroshot_classification`` (acc1, acc5, mean_per_class_recall) when the set has
class names, ``zeroshot_retrieval`` (image_retrieval_recall@k: text -> image, and
text_retrieval_recall@k: image -> any of its captions; k = 1, 5, 10) when its samples
have captions. Images are streamed and only their embeddings kept. The figures are
``apply.benchmark``'s, the code the trainer's evaluation runs.

Results: a JSON list, one entry per dataset and task, each in CLIP_benchmark's shape
(``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``, ``language``) plus
``samples``, ``skipped`` (counts by reason) and ``step``; and a table on the terminal.
"""

from __future__ import annotations

import posixpath
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from apply.benchmark import (
    CLASSNAMES_FILE, DEFAULT_TEMPLATES, RECALL_AT, TEMPLATES_FILE, Classes, EvalSample, class_embeddings,
    image_folder_classes, iter_image_folder, iter_tar_set, read_lines, recall_at_k, topk_metrics,
)  # fmt: skip
from apply.options import ModelOptions
from core.cli import run
from core import storage
from core.config import DataError, option, parse_config, require
from core.executor import Progress, progress_enabled
from core.reasons import Reason

DESCRIPTION = "Zero-shot classification and image-text retrieval figures on benchmark sets, as CLIP_benchmark reports them."
EPILOG = """\
examples:
  python -m apply.evaluate --checkpoint runs/demo/checkpoints --datasets data/demo/eval --output_file results.json
  python -m apply.evaluate --checkpoint C --datasets wds_cifar10,wds_flickr30k,my_imagefolder --split test
"""
TASKS = ("zeroshot_classification", "zeroshot_retrieval")


@dataclass
class EvalConfig(ModelOptions):
    datasets: str = option("", "comma-separated dataset folders: CLIP_benchmark WebDataset layout or ImageFolder "
                               "(local or s3://)")  # fmt: skip
    split: str = option("test", "the split folder of each dataset ({root}/{split}/*.tar, or {root}/{split}/{class}/)")
    output_file: str = option("", "write the results here as JSON (local or s3://); empty: only the table")
    language: str = option("en", "recorded in each result, as CLIP_benchmark does")
    progress: bool | None = option(None, "progress bar; default: when stderr is a terminal")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "datasets", "split")

    @property
    def roots(self) -> list[str]:
        return [d.strip().rstrip("/") for d in self.datasets.split(",") if d.strip()]


@dataclass(frozen=True)
class Dataset:
    root: str
    kind: str  # "wds" or "imagefolder"
    folder: str  # where the samples are: the split's folder of tars, or the folder of class folders
    classes: Classes | None


def find_dataset(root: str, split: str) -> Dataset:
    """The dataset at ``root``: its layout, its samples' folder, its class names and templates; ``DataError`` if none."""
    if not storage.exists(root):
        raise DataError(f"--datasets {root}: no such folder")
    tar_file = root.endswith(".tar")
    base = root.rsplit("/", 1)[0] if tar_file and "/" in root else ("." if tar_file else root)
    templates_path = storage.join(base, TEMPLATES_FILE)
    templates = read_lines(templates_path) if storage.exists(templates_path) else list(DEFAULT_TEMPLATES)
    split_folder = storage.join(root, split)
    # CLIP_benchmark's {split}/*.tar; or the trainer's eval set: a .tar, or a folder of them, beside classnames.txt
    tars_at = root if tar_file else next((f for f in (split_folder, root) if storage.list_files(f, ".tar")), None)
    if tars_at is not None:
        names_path = storage.join(base, CLASSNAMES_FILE)
        names = read_lines(names_path) if storage.exists(names_path) else []
        return Dataset(root, "wds", tars_at, Classes(names, templates) if names else None)
    fs, fs_path = storage.filesystem(split_folder)
    folder = split_folder if fs.isdir(fs_path) else root
    names = image_folder_classes(folder)
    if not names:
        raise DataError(f"--datasets {root}: neither CLIP_benchmark's layout ({split}/*.tar beside {CLASSNAMES_FILE}) "
                        f"nor an ImageFolder (a folder per class)")  # fmt: skip
    return Dataset(root, "imagefolder", folder, Classes(names, templates))


def _samples(dataset: Dataset, image_size: int, skipped: Counter) -> Iterator[EvalSample]:
    if dataset.kind == "imagefolder":
        return iter_image_folder(dataset.folder, dataset.classes.names, image_size, skipped)
    return iter_tar_set(dataset.folder, image_size, len(dataset.classes.names) if dataset.classes else None, skipped)


@dataclass
class Embedded:
    """A dataset's images as embeddings, with their labels (-1: none) and captions."""

    images: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    captions: list[str]
    caption_image: list[int]  # per caption, its image's row
    skipped: dict[str, int]


def embed(model, dataset: Dataset, batch_size: int, bar: Progress) -> Embedded:
    """Stream the dataset's images through the model, keeping only embeddings, labels and captions."""
    skipped: Counter = Counter()
    rows, labels, captions, caption_image, batch = [], [], [], [], []

    def flush() -> None:
        if batch:
            rows.append(model.encode_images(torch.stack([s.image for s in batch])))
            bar.running(dataset.root, {"items": len(labels)})
            batch.clear()

    for sample in _samples(dataset, model.image_size, skipped):
        if sample.label is None and not sample.captions:
            skipped[Reason.LABEL_MISSING.value] += 1
            continue
        captions += sample.captions
        caption_image += [len(labels)] * len(sample.captions)
        labels.append(-1 if sample.label is None else sample.label)
        batch.append(sample)
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.finished(dataset.root, {"items": len(labels)})
    images = torch.cat(rows) if rows else torch.empty(0, model.embed_dim)
    return Embedded(images, torch.tensor(labels, dtype=torch.long), captions, caption_image, dict(skipped))


def classification(model, dataset: Dataset, embedded: Embedded) -> dict:
    """acc1, acc5, mean_per_class_recall over the labelled images."""
    labelled = embedded.labels >= 0
    classifier = class_embeddings(model.encode_texts, dataset.classes.prompts())
    result = topk_metrics(embedded.images[labelled] @ classifier.T, embedded.labels[labelled])
    return {"metrics": result.clip_benchmark(), "samples": result.n}


def retrieval(model, embedded: Embedded, batch_size: int) -> dict:
    """Recall@k both ways over the captioned images (an image is found by any of its captions)."""
    images = sorted(set(embedded.caption_image))
    row_of = {image: row for row, image in enumerate(images)}
    texts = torch.cat([model.encode_texts(embedded.captions[i : i + batch_size])
                       for i in range(0, len(embedded.captions), batch_size)])  # fmt: skip
    text_image = torch.tensor([row_of[i] for i in embedded.caption_image])
    figures = recall_at_k(embedded.images[images], texts, text_image=text_image)
    metrics = {}
    for k in RECALL_AT:
        metrics[f"image_retrieval_recall@{k}"] = figures[f"text_to_image_R@{k}"]
        metrics[f"text_retrieval_recall@{k}"] = figures[f"image_to_text_R@{k}"]
    return {"metrics": metrics, "samples": len(images), "captions": len(texts)}


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Every dataset's results, one entry per dataset and task (see the module docstring)."""
    datasets = [find_dataset(root, cfg.split) for root in cfg.roots]  # every layout checked before any work
    model = cfg.load()
    bar = Progress("eval", unit="dataset", item="image", enabled=progress_enabled(cfg.progress))
    results = []
    try:
        for dataset in datasets:
            embedded = embed(model, dataset, cfg.batch_size, bar)
            has_labels = bool((embedded.labels >= 0).any())
            if has_labels and dataset.classes is None:
                raise DataError(f"--datasets {dataset.root}: its samples have .cls labels but there is no "
                                f"{storage.join(dataset.root, CLASSNAMES_FILE)} (one class name per line)")  # fmt: skip
            tasks = {}
            if has_labels:
                tasks["zeroshot_classification"] = classification(model, dataset, embedded)
            if embedded.captions:
                tasks["zeroshot_retrieval"] = retrieval(model, embedded, cfg.batch_size)
            if not tasks:
                raise DataError(f"--datasets {dataset.root}: no labelled or captioned images in {dataset.folder} "
                                f"(skipped: {embedded.skipped})")  # fmt: skip
            for task, figures in tasks.items():
                results.append({"dataset": dataset.root, "model": model.name, "pretrained": model.path, "task": task,
                                **figures, "language": cfg.language, "skipped": embedded.skipped,
                                "step": model.step})  # fmt: skip
    finally:
        bar.close()
    return results


def table(results: list[dict]) -> list[str]:
    """One line per dataset and task."""
    def f(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = []
    for r in results:
        name, m = posixpath.basename(r["dataset"]) or r["dataset"], r["metrics"]
        if r["task"] == "zeroshot_classification":
            figures = f"acc1 {f(m['acc1'])}  acc5 {f(m['acc5'])}  mean per-class recall {f(m['mean_per_class_recall'])}"
        else:
            recall = "/".join
            figures = (f"image R@1/5/10 {recall(f(m[f'image_retrieval_recall@{k}']) for k in RECALL_AT)}  "
                       f"text R@1/5/10 {recall(f(m[f'text_retrieval_recall@{k}']) for k in RECALL_AT)}")  # fmt: skip
        lines.append(f"  {name:<20} {r['task']:<24} n={r['samples']:<6} {figures}")
    return lines


def main(argv: list[str] | None = None) -> int:
    prog = "python -m apply.evaluate"
    cfg = parse_config(EvalConfig, argv, prog=prog, description=DESCRIPTION, epilog=EPILOG)

    def body() -> int:
        results = evaluate(cfg)
        print("\n".join(table(results)))
        if cfg.output_file:
            storage.write_json(cfg.output_file, results)
            print(f"written: {cfg.output_file}")
        return 0

    return run(prog, body)


if __name__ == "__main__":
    sys.exit(main())
