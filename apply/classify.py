"""Zero-shot classification of any images with your own labels: ``python -m apply.classify``.

Inputs (``--images``, local or ``s3://``): a folder of images (searched recursively for
.jpg/.jpeg/.png/.webp), a text file listing image paths (one per line; relative ones are
relative to the list's folder), or shards: a ``.tar``, a folder of ``*.tar``, or a text
file listing tars. Every image is decoded as the trainer decodes its shards.

Labels: ``--labels "cat,dog"`` (``--labels imagenet``: open_clip's ImageNet class names) or
``--labels_file`` (one per line). Prompts: ``--templates FILE`` (one per line, ``{c}`` or
``{}`` standing for the label; ``openai_imagenet``: the CLIP paper's 80 templates as open_clip
ships them), by default ``a photo of a {c}.``. A label's embedding is the normalised mean
of its prompts' embeddings (``apply.benchmark.class_embeddings``); an image's label
probabilities are ``softmax(logit_scale * cosine)``.

Output: one row per image, in input order, written atomically (parquet; CSV when the file
ends in ``.csv``, or beside the parquet with ``--csv``): ``image`` (the path, or the key in a
shard), ``shard`` (the tar, or null), ``label_1``/``prob_1`` .. ``label_k``/``prob_k`` and
``error`` (a ``core.reasons`` code when the image could not be read or decoded: its label
columns are then null).
"""

from __future__ import annotations

import contextlib
import posixpath
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import open_clip
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from apply.benchmark import Classes, class_embeddings, image_files, read_lines
from apply.options import ModelOptions
from core.cli import run
from core import storage
from core.config import DataError, at_least, option, parse_config, problem, require
from core.executor import Progress, progress_enabled
from core.layout import image_member
from core.reasons import Reason
from train import data as data_mod

DEFAULT_TEMPLATE = "a photo of a {c}."
DESCRIPTION = "Zero-shot classification of images (a folder, a list, or shards) with your own labels."
EPILOG = """\
examples:
  python -m apply.classify --checkpoint runs/demo/checkpoints --images photos/ --labels "cat,dog,car" \\
      --output_file labels.parquet
  python -m apply.classify --checkpoint C --images shards/ --labels_file labels.txt --templates prompts.txt \\
      --output_file labels.csv --top_k 3
  python -m apply.classify --checkpoint C --images list.txt --labels imagenet --templates openai_imagenet \\
      --output_file s3://bucket/imagenet_labels.parquet --csv
"""


@dataclass
class ClassifyConfig(ModelOptions):
    images: str = option("", "a folder of images (recursive), a text file of image paths, a .tar, a folder of "
                             ".tar shards or a text file of tars (local or s3://)")  # fmt: skip
    labels: str = option("", "comma-separated labels (\"cat,dog\"), or imagenet for open_clip's ImageNet class names")
    labels_file: str = option("", "labels, one per line (instead of --labels)")
    templates: str = option("", "prompt templates, one per line with {c} (or {}) for the label; openai_imagenet for "
                                "the CLIP paper's templates; default: \"a photo of a {c}.\"")  # fmt: skip
    output_file: str = option("", "where the rows go: .parquet, or .csv for CSV (local or s3://)")
    csv: bool = option(False, "also write a CSV beside the parquet file (same name, .csv)")
    top_k: int = option(5, "labels (with probabilities) kept per image; at most the number of labels")
    show: int = option(10, "rows printed on the terminal")
    progress: bool | None = option(None, "progress bar; default: when stderr is a terminal")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "images", "output_file")
        if bool(self.labels) == bool(self.labels_file):
            problem("labels / labels_file: give exactly one (--labels \"a,b,c\" or --labels_file FILE)")
        at_least(self, 1, "top_k")
        at_least(self, 0, "show")


# -- labels and prompts ----------------------------------------------------------------------------


def read_labels(cfg: ClassifyConfig) -> list[str]:
    """The labels the options name, in order; ``DataError`` for a missing or empty file, or a label given twice."""
    if cfg.labels.strip() == "imagenet":
        return list(open_clip.IMAGENET_CLASSNAMES)  # as shipped: 1000 names, two of them twice (index = class)
    if cfg.labels_file:
        if not storage.exists(cfg.labels_file):
            raise DataError(f"--labels_file {cfg.labels_file}: no such file")
        labels = read_lines(cfg.labels_file)
    else:
        labels = [label.strip() for label in cfg.labels.split(",") if label.strip()]
    where = f"--labels_file {cfg.labels_file}" if cfg.labels_file else f"--labels {cfg.labels!r}"
    if not labels:
        raise DataError(f"{where}: no labels in it")
    repeated = sorted(label for label, n in Counter(labels).items() if n > 1)
    if repeated:
        raise DataError(f"{where}: labels given twice: {', '.join(repeated)}")
    return labels


def read_templates(spec: str) -> list[str]:
    """Prompt templates: the default, open_clip's CLIP-paper ImageNet ones, or a file's lines (each with {c} or {})."""
    if not spec:
        return [DEFAULT_TEMPLATE]
    if spec == "openai_imagenet":
        return [template("{c}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES]
    if not storage.exists(spec):
        raise DataError(f"--templates {spec}: no such file (or use openai_imagenet)")
    templates = read_lines(spec)
    if not templates:
        raise DataError(f"--templates {spec}: no templates in it")
    without = [t for t in templates if "{c}" not in t and "{}" not in t]
    if without:
        raise DataError(f"--templates {spec}: {without[0]!r} has no {{c}} (or {{}}) where the label goes")
    return templates


# -- inputs ------------------------------------------------------------------------------------------


class Item(NamedTuple):
    """One image to classify: its bytes, or why there are none."""

    image: str  # the path, or the key in a shard
    shard: str | None
    data: bytes | None
    error: str | None


def resolve_inputs(path: str) -> tuple[str, list[str]]:
    """(``"files"`` or ``"shards"``, their paths) for ``--images``; ``DataError`` when there is nothing."""
    if not storage.exists(path):
        raise DataError(f"--images {path}: no such file or folder")
    fs, fs_path = storage.filesystem(path)
    if fs.isdir(fs_path):
        tars = storage.list_files(path, ".tar")
        if tars:
            return "shards", tars
        files = image_files(path)
        if not files:
            raise DataError(f"--images {path}: no images (.jpg, .jpeg, .png, .webp) in it, and no .tar shards")
        return "files", files
    if path.endswith(".tar"):
        return "shards", [path]
    lines = read_lines(path)
    if not lines:
        raise DataError(f"--images {path}: an empty list")
    base = posixpath.dirname(path)
    paths = [line if "://" in line or line.startswith("/") or not base else storage.join(base, line) for line in lines]
    return ("shards" if all(p.endswith(".tar") for p in paths) else "files"), paths


def iter_items(kind: str, paths: list[str], skipped: Counter) -> Iterator[Item]:
    """The images of the inputs, in order; shard-level damage (a cut tar) is counted in ``skipped``."""
    if kind == "files":
        for path in paths:
            try:
                with storage.open_file(path, "rb") as handle:
                    yield Item(path, None, handle.read(), None)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                yield Item(path, None, None, Reason.IMAGE_MISSING.value)
        return
    for tar in paths:
        for sample in data_mod.iter_tar_samples(tar, skipped):
            member = image_member(sample.members)
            if member is None:
                yield Item(sample.key, tar, None, Reason.IMAGE_MISSING.value)
            else:
                yield Item(sample.key, tar, member[1], None)


# -- classification ------------------------------------------------------------------------------------


def output_schema(top_k: int) -> pa.Schema:
    """The output's columns for ``top_k`` labels per image."""
    fields = [("image", pa.string()), ("shard", pa.string())]
    for i in range(1, top_k + 1):
        fields += [(f"label_{i}", pa.string()), (f"prob_{i}", pa.float32())]
    return pa.schema(fields + [("error", pa.string())])


def _classify_batch(model, classifier, labels: list[str], items: list[Item], top_k: int) -> list[dict]:
    """Rows for ``items`` (in order): decoded ones classified together, the others with their error."""
    rows, images, decoded = [], [], []
    for item in items:
        row = {"image": item.image, "shard": item.shard, "error": item.error}
        if item.data is not None:
            try:
                images.append(model.decode(item.data))
                decoded.append(row)
            except data_mod.SkipSample as skip:
                row["error"] = skip.reason
        rows.append(row)
    if images:
        features = model.encode_images(torch.stack(images))
        probs = (model.logit_scale * features @ classifier.T).softmax(dim=-1)
        top = probs.topk(top_k, dim=-1)
        for row, values, indices in zip(decoded, top.values.tolist(), top.indices.tolist()):
            for i, (p, index) in enumerate(zip(values, indices), start=1):
                row[f"label_{i}"], row[f"prob_{i}"] = labels[index], p
    return rows


class _Writers:
    """The parquet and/or CSV file, streamed batch by batch, each committed by a rename at the end."""

    def __init__(self, cfg: ClassifyConfig, schema):
        self.schema, self.stack = schema, contextlib.ExitStack()
        as_csv = cfg.output_file.lower().endswith(".csv")
        self.paths = [cfg.output_file]
        if cfg.csv and not as_csv:
            self.paths.append(posixpath.splitext(cfg.output_file)[0] + ".csv")
        self.writers = []
        for path in self.paths:
            handle = self.stack.enter_context(storage.atomic_write(path, "wb"))
            as_csv = path.lower().endswith(".csv")
            writer = pacsv.CSVWriter(handle, schema) if as_csv else pq.ParquetWriter(handle, schema)
            self.stack.callback(writer.close)
            self.writers.append(writer)

    def write(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        for writer in self.writers:
            writer.write_table(table)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stack.__exit__(*exc)


@dataclass
class Summary:
    rows: int
    errors: Counter
    top1: Counter
    first: list[dict]
    skipped: dict
    paths: list[str]


def classify(cfg: ClassifyConfig) -> Summary:
    """Classify every input image and write the rows; see the module docstring."""
    labels, templates = read_labels(cfg), read_templates(cfg.templates)
    kind, paths = resolve_inputs(cfg.images)
    model = cfg.load()
    classifier = class_embeddings(model.encode_texts, Classes(labels, templates).prompts())
    top_k = min(cfg.top_k, len(labels))
    skipped: Counter = Counter()
    summary = Summary(0, Counter(), Counter(), [], {}, [])
    bar = Progress("classify", unit="batch", item="image", total=len(paths) if kind == "files" else None,
                   enabled=progress_enabled(cfg.progress))  # fmt: skip
    with _Writers(cfg, output_schema(top_k)) as writers:
        batch: list[Item] = []
        for item in iter_items(kind, paths, skipped):
            batch.append(item)
            if sum(i.data is not None for i in batch) >= cfg.batch_size:
                _flush(model, classifier, labels, batch, top_k, writers, summary, cfg.show, bar)
                batch = []
        _flush(model, classifier, labels, batch, top_k, writers, summary, cfg.show, bar)
        summary.paths = writers.paths
    bar.close()
    summary.skipped = dict(skipped)
    return summary


def _flush(model, classifier, labels, batch, top_k, writers, summary: Summary, show: int, bar: Progress) -> None:
    if not batch:
        return
    rows = _classify_batch(model, classifier, labels, batch, top_k)
    writers.write(rows)
    summary.rows += len(rows)
    summary.errors.update(r["error"] for r in rows if r["error"])
    summary.top1.update(r["label_1"] for r in rows if r.get("label_1") is not None)
    summary.first += rows[: max(0, show - len(summary.first))]
    bar.add({"items": len(rows)})


# -- the terminal -------------------------------------------------------------------------------------


def table(summary: Summary, top_k: int) -> list[str]:
    """The first rows and the counts of top-1 labels, as lines."""
    shown = min(top_k, 3)
    lines = []
    for row in summary.first:
        name = row["image"] if len(row["image"]) <= 40 else "..." + row["image"][-37:]
        if row["error"]:
            cells = f"error: {row['error']}"
        else:
            cells = "  ".join(f"{row[f'label_{i}']} {row[f'prob_{i}']:.2f}" for i in range(1, shown + 1))
        lines.append(f"  {name:<40}  {cells}")
    lines.append(f"{summary.rows} images ({len(summary.first)} shown), {sum(summary.errors.values())} not "
                 f"classified" + ("".join(f", {r} {n}" for r, n in sorted(summary.errors.items()))))  # fmt: skip
    if summary.skipped:
        lines.append("shard damage (samples after it not read): " +
                     ", ".join(f"{r} {n}" for r, n in sorted(summary.skipped.items())))  # fmt: skip
    counts = ", ".join(f"{label} {n}" for label, n in summary.top1.most_common(10))
    more = f" (+{len(summary.top1) - 10} more labels)" if len(summary.top1) > 10 else ""
    lines.append(f"top-1 label counts: {counts or 'none'}{more}")
    lines.append("written: " + ", ".join(summary.paths))
    return lines


def main(argv: list[str] | None = None) -> int:
    prog = "python -m apply.classify"
    cfg = parse_config(ClassifyConfig, argv, prog=prog, description=DESCRIPTION, epilog=EPILOG)

    def body() -> int:
        summary = classify(cfg)
        print("\n".join(table(summary, cfg.top_k)))
        return 0

    return run(prog, body)


if __name__ == "__main__":
    sys.exit(main())
