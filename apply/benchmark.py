"""Evaluation sets and the figures computed on them: one implementation for ``python -m apply.evaluate``
and for the trainer's periodic evaluation (``train/zeroshot.py``, ``train/evaluate.py``).

Sets (streamed, nothing held but what a caller keeps):

* CLIP_benchmark's WebDataset layout: ``{root}/classnames.txt``,
  ``{root}/zeroshot_classification_templates.txt``, ``{root}/{split}/{n}.tar`` whose samples
  hold an image, a label (``{key}.cls``, an integer, or ``label`` / ``class_index`` in
  ``{key}.json``) and/or captions (``{key}.txt``, one per line). The trainer's eval tar is
  the same with the text files beside the tar or in its parent folder (``find_beside``).
* ImageFolder: a folder per class, the folder names (sorted) are the class names.

Figures (pure functions of embeddings):

* zero-shot: a class's embedding is the normalised mean of its prompts' normalised
  embeddings (prompt ensemble, ``class_embeddings``); ``topk_metrics`` gives top-1,
  top-5 and the mean per-class recall (top-1 averaged over the classes that have images);
* retrieval: ``recall_at_k`` in both directions, an image's captions all count as its own.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from core import storage
from core.errors import ConfigError
from core.layout import IMAGE_EXTENSIONS
from core.reasons import Reason
from train import data as data_mod

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
RECALL_AT = (1, 5, 10)


# -- class names and templates ----------------------------------------------------------


@dataclass(frozen=True)
class Classes:
    """What a zero-shot classifier is built from."""

    names: list[str]
    templates: list[str]

    def prompts(self) -> list[list[str]]:
        """Per class, its prompts: each template with ``{c}`` (or ``{}``) replaced by the class name."""
        return [[t.replace("{c}", name).replace("{}", name) for t in self.templates] for name in self.names]


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


# -- samples ----------------------------------------------------------------------------------


@dataclass
class EvalSet:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,), index into the class names
    keys: list[str]
    skipped: dict[str, int]


@dataclass(frozen=True)
class EvalSample:
    key: str
    image: torch.Tensor  # uint8 (3, S, S)
    label: int | None  # None: no usable label (none, or outside 0..num_classes-1)
    captions: list[str] = field(default_factory=list)


def eval_tars(path: str) -> list[str]:
    """The tar itself (compressed ones too), or every ``*.tar`` of a folder in name order."""
    fs, fs_path = storage.filesystem(path)
    return storage.list_files(path, ".tar") if fs.isdir(fs_path) else [path]


def label_of(members: dict[str, bytes], num_classes: int | None) -> int | None:
    """The class index from ``.cls`` or ``.json`` (``label`` / ``class_index``); None if none is usable."""
    try:
        if "cls" in members:
            label = int(members["cls"].decode("utf-8").strip())
        else:
            meta = json.loads(members["json"].decode("utf-8"))
            label = meta["label"] if "label" in meta else meta["class_index"]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(label, int) or label < 0 or (num_classes is not None and label >= num_classes):
        return None
    return label


def captions_of(members: dict[str, bytes]) -> list[str]:
    """The ``.txt`` member's non-empty lines (CLIP_benchmark: one caption per line); [] if none."""
    try:
        text = members.get("txt", b"").decode("utf-8")
    except UnicodeDecodeError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def iter_tar_set(path: str, image_size: int, num_classes: int | None, skipped: Counter) -> Iterator[EvalSample]:
    """Decoded samples of an eval tar (or a folder of tars), in order; undecodable ones counted in ``skipped``."""
    for tar in eval_tars(path):
        for sample in data_mod.iter_tar_samples(tar, skipped):
            try:
                image = data_mod.decode_image(data_mod.image_bytes(sample.members), image_size)
            except data_mod.SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            yield EvalSample(sample.key, image, label_of(sample.members, num_classes), captions_of(sample.members))


def image_folder_classes(root: str) -> list[str]:
    """ImageFolder's class names: the sub-folders of ``root``, sorted."""
    fs, fs_path = storage.filesystem(root)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False) if fs.isdir(p))


def image_files(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in path order (full paths, with the scheme if remote)."""
    fs, fs_path = storage.filesystem(folder)
    suffixes = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
    found = sorted(p for p in fs.find(fs_path) if p.lower().endswith(suffixes))
    return found if storage.is_local(folder) else [fs.unstrip_protocol(p) for p in found]


def iter_image_folder(root: str, classes: list[str], image_size: int, skipped: Counter) -> Iterator[EvalSample]:
    """Decoded images of an ImageFolder, class by class; the key is the path below ``root``."""
    for label, name in enumerate(classes):
        for path in image_files(storage.join(root, name)):
            try:
                with storage.open_file(path, "rb") as handle:
                    image = data_mod.decode_image(handle.read(), image_size)
            except data_mod.SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            yield EvalSample(f"{name}/{posixpath.basename(path)}", image, label)


def load_eval_set(path: str, image_size: int, num_classes: int) -> EvalSet:
    """The labelled images of an eval tar (or folder of tars), held in memory (the trainer evaluates them often)."""
    skipped: Counter = Counter()
    images, labels, keys = [], [], []
    for sample in iter_tar_set(path, image_size, num_classes, skipped):
        if sample.label is None:
            skipped[Reason.LABEL_MISSING.value] += 1
            continue
        images.append(sample.image)
        labels.append(sample.label)
        keys.append(sample.key)
    if not images:
        raise ValueError(f"{path}: no usable eval samples (skipped: {dict(skipped)})")
    return EvalSet(torch.stack(images), torch.tensor(labels), keys, dict(skipped))


# -- figures ------------------------------------------------------------------------------------


@torch.no_grad()
def class_embeddings(encode_texts: Callable[[list[str]], torch.Tensor], prompts: list[list[str]]) -> torch.Tensor:
    """(classes, D): per class, the normalised mean of its prompts' embeddings (``encode_texts`` normalises them)."""
    rows = [torch.nn.functional.normalize(encode_texts(p).float().mean(dim=0), dim=-1) for p in prompts]
    return torch.stack(rows)


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

    def clip_benchmark(self) -> dict:
        """The figures under CLIP_benchmark's names."""
        return {"acc1": self.top1, "acc5": self.top5, "mean_per_class_recall": self.mean_per_class_recall}


def _rate(value: float | None) -> str:
    # Rounded as zeroshot.json stores it first, so a line printed from the live result
    # and one printed from the file agree (0.22499 and 0.225 would not).
    return "n/a" if value is None else f"{round(value, 4):.2f}"


def topk_metrics(scores: torch.Tensor, labels: torch.Tensor) -> TopKResult:
    """Top-1, top-5 and per-class top-1 from (N, classes) similarities; pure."""
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


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks=RECALL_AT, chunk: int = 1024,
                text_image: torch.Tensor | None = None) -> dict:  # fmt: skip
    """``image_to_text_R@k`` and ``text_to_image_R@k``; pure.

    Text ``t`` belongs to image ``text_image[t]`` (default: text ``i`` to image ``i``); an
    image is found at k when any of its texts is among the k most similar texts. The
    similarity matrix is built ``chunk`` rows at a time, so memory is linear in N. A tie
    with the true partner counts in the partner's favour.
    """
    n_images, n_texts = len(image_features), len(text_features)
    if n_images == 0 or n_texts == 0:
        return {f"{d}_R@{k}": None for d in ("image_to_text", "text_to_image") for k in ks}
    if text_image is None:
        text_image = torch.arange(n_texts)
    figures = {}
    ranks = []  # image -> text: texts strictly more similar than the image's best own text
    for start in range(0, n_images, chunk):
        sims = image_features[start : start + chunk] @ text_features.T
        own = text_image[None, :] == torch.arange(start, start + len(sims))[:, None]
        best = sims.masked_fill(~own, float("-inf")).max(dim=1).values
        ranks.append((sims > best[:, None]).sum(dim=1))
    rank = torch.cat(ranks)
    for k in ks:
        figures[f"image_to_text_R@{k}"] = round(float((rank < k).float().mean()), 4)
    ranks = []  # text -> image: images strictly more similar than the text's own image
    for start in range(0, n_texts, chunk):
        sims = text_features[start : start + chunk] @ image_features.T
        own = sims[torch.arange(len(sims)), text_image[start : start + len(sims)]]
        ranks.append((sims > own[:, None]).sum(dim=1))
    rank = torch.cat(ranks)
    for k in ks:
        figures[f"text_to_image_R@{k}"] = round(float((rank < k).float().mean()), 4)
    return figures
