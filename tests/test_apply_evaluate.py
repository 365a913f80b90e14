"""apply.evaluate: figures against a hand computation with open_clip's encoders, on both layouts; errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch

from apply import benchmark
from apply import evaluate as evaluate_mod
from tests import _train_fixtures as fx
from train import checkpoint as ckpt
from train import model as model_mod
from train.data import decode_image

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "orange cross"]
TEMPLATES = ["a photo of a {c}.", "a {c}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(1)
    module = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(9, 0, 0), "webclip-tiny", model_mod.image_size_of(module), {})
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint):
    """open_clip's own model, tokenizer and encoders: (encode_images(jpegs), encode_texts(texts))."""
    module, _, _ = open_clip.create_model_and_transforms("webclip-tiny", pretrained=ckpt.model_file(checkpoint))
    module.eval()
    tokenizer = open_clip.get_tokenizer("webclip-tiny")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def images(jpegs):
        batch = torch.stack([decode_image(j, model_mod.image_size_of(module)) for j in jpegs]).float() / 255.0
        return torch.nn.functional.normalize(module.encode_image((batch - mean) / std), dim=-1)

    @torch.no_grad()
    def texts(strings):
        return torch.nn.functional.normalize(module.encode_text(tokenizer(strings)), dim=-1)

    return images, texts


def _hand_classification(image_features, labels, class_features) -> dict:
    """acc1, acc5, mean per-class recall by loops."""
    scores = (image_features @ class_features.T).tolist()
    hits1, hits5, per_class = 0, 0, {}
    for row, label in zip(scores, labels):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        hits1 += order[0] == label
        hits5 += label in order[:5]
        per_class.setdefault(label, []).append(order[0] == label)
    recalls = [sum(v) / len(v) for v in per_class.values()]
    return {"acc1": hits1 / len(labels), "acc5": hits5 / len(labels), "mean_per_class_recall": sum(recalls) / len(recalls)}


def _class_features(texts, classes, templates):
    rows = [torch.nn.functional.normalize(texts([t.replace("{c}", c) for t in templates]).mean(0), dim=0)
            for c in classes]  # fmt: skip
    return torch.stack(rows)


def _hand_retrieval(image_features, text_features, text_image) -> dict:
    """Recall@k both ways by loops: an image's rank is that of its best caption; ties go to the true partner."""
    sims = (image_features @ text_features.T).tolist()
    figures = {}
    for k in (1, 5, 10):
        found = 0
        for i, row in enumerate(sims):
            best = max(row[t] for t in range(len(row)) if text_image[t] == i)
            found += sum(s > best for s in row) < k
        figures[f"text_retrieval_recall@{k}"] = round(found / len(sims), 4)
        found = 0
        for t in range(len(text_image)):
            own = sims[text_image[t]][t]
            found += sum(sims[i][t] > own for i in range(len(sims))) < k
        figures[f"image_retrieval_recall@{k}"] = round(found / len(text_image), 4)
    return figures


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory):
    """CLIP_benchmark's layout: 14 labelled and captioned images (some with two captions) in two tars, one
    image with captions and no label, one broken image, one sample with neither label nor caption."""
    root = tmp_path_factory.mktemp("wds_set")
    (root / "test").mkdir()
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    samples = list(fx.eval_samples(per_class=1, seed=4))[:15]
    jpegs, labels, captions, members = [], [], [], [[], []]
    for i, (jpeg, caption, _) in enumerate(samples):
        label = i % len(CLASSES) if i < 14 else None
        texts = [caption, f"picture number {i}"] if i % 3 == 0 else [caption]
        tar = members[i % 2]
        tar += [(f"{i:04d}.jpg", jpeg), (f"{i:04d}.txt", "\n".join(texts).encode())]
        if label is not None:
            tar.append((f"{i:04d}.cls", str(label).encode()))
        jpegs.append(jpeg)
        labels.append(label)
        captions.append(texts)
    members[0] += [("9000.jpg", b"\xff\xd8 broken"), ("9000.cls", b"1"), ("9001.jpg", samples[0][0])]
    fx.write_tar(str(root / "test" / "0.tar"), members[0])
    fx.write_tar(str(root / "test" / "1.tar"), members[1])
    order = sorted(range(15), key=lambda i: (i % 2, i))  # tar by tar, in each tar's order
    return str(root), [jpegs[i] for i in order], [labels[i] for i in order], [captions[i] for i in order]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder under {root}/test/: three classes (folder names), unequal sizes."""
    root = tmp_path_factory.mktemp("imagefolder")
    samples = [jpeg for jpeg, _, _ in fx.eval_samples(per_class=1, seed=5)][:9]
    layout = {"blue square": samples[0:2], "green triangle": samples[2:7], "red circle": samples[7:9]}
    for name, jpegs in layout.items():
        (root / "test" / name).mkdir(parents=True)
        for i, jpeg in enumerate(jpegs):
            (root / "test" / name / f"{i}.jpg").write_bytes(jpeg)
    return str(root), layout


def test_both_layouts_in_one_call_match_a_hand_computation(checkpoint, reference, wds_set, image_folder, tmp_path,
                                                          capsys):  # fmt: skip
    encode_images, encode_texts = reference
    root, jpegs, labels, captions = wds_set
    folder_root, layout = image_folder
    out = tmp_path / "results.json"
    assert evaluate_mod.main(["--checkpoint", checkpoint, "--datasets", f"{root},{folder_root}/", "--output_file",
                              str(out), "--batch_size", "4", "--device", "cpu"]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert [(r["dataset"], r["task"]) for r in results] == [
        (root, "zeroshot_classification"), (root, "zeroshot_retrieval"), (folder_root, "zeroshot_classification")]
    for r in results:  # CLIP_benchmark's shape, and what we add
        assert set(r) - {"captions"} == {"dataset", "model", "pretrained", "task", "metrics", "language", "samples",
                                         "skipped", "step"}  # fmt: skip
        assert (r["model"], r["pretrained"], r["language"], r["step"]) == (
            "webclip-tiny", ckpt.model_file(checkpoint), "en", 9)
    assert results[0]["skipped"] == {"decode_error": 1, "label_missing": 1}

    features = encode_images(jpegs)
    labelled = [i for i, label in enumerate(labels) if label is not None]
    expected = _hand_classification(features[labelled], [labels[i] for i in labelled],
                                    _class_features(encode_texts, CLASSES, TEMPLATES))  # fmt: skip
    assert results[0]["samples"] == 14 and results[0]["metrics"] == pytest.approx(expected, abs=1e-6)

    texts = [c for cs in captions for c in cs]
    text_image = [i for i, cs in enumerate(captions) for _ in cs]
    expected = _hand_retrieval(features, encode_texts(texts), text_image)
    assert (results[1]["samples"], results[1]["captions"]) == (15, 20) and results[1]["metrics"] == pytest.approx(expected, abs=1e-6)

    names = sorted(layout)
    folder_jpegs = [j for name in names for j in layout[name]]
    folder_labels = [c for c, name in enumerate(names) for _ in layout[name]]
    expected = _hand_classification(encode_images(folder_jpegs), folder_labels,
                                    _class_features(encode_texts, names, list(benchmark.DEFAULT_TEMPLATES)))  # fmt: skip
    assert results[2]["samples"] == 9 and results[2]["metrics"] == pytest.approx(expected, abs=1e-6)

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == [root.rsplit("/", 1)[1], "zeroshot_classification", "n=14"]
    assert "image R@1/5/10 " in printed[1] and printed[-1] == f"written: {out}"


def test_figures_on_a_constructed_case():
    """Known answers: per-class recall with unequal classes; retrieval with two captions for one image."""
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.0, 0.1, 0.9]])
    result = benchmark.topk_metrics(scores, torch.tensor([0, 0, 1, 1, 1]))  # class 2 has no image
    assert (result.top1, result.per_class_top1) == (pytest.approx(3 / 5), [1.0, pytest.approx(1 / 3), None])
    assert result.mean_per_class_recall == pytest.approx((1.0 + 1 / 3) / 2)
    assert result.clip_benchmark() == {"acc1": result.top1, "acc5": 1.0, "mean_per_class_recall":
                                       result.mean_per_class_recall}  # fmt: skip

    images = torch.eye(3)
    # Texts 0 and 1 are image 0's, text 2 image 1's, text 3 image 2's. Image 1's nearest text is text 1 (not its
    # own): found at 2, not at 1; images 0 and 2 at 1. Text 1 is nearest image 1, text 2 nearest image 2: at 2.
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.3, 0.9], [0, 0, 1.0]])
    figures = benchmark.recall_at_k(images, texts, ks=(1, 2), text_image=torch.tensor([0, 0, 1, 2]))
    assert figures == {"image_to_text_R@1": round(2 / 3, 4), "image_to_text_R@2": 1.0,
                       "text_to_image_R@1": 0.5, "text_to_image_R@2": 1.0}  # fmt: skip


@pytest.mark.parametrize("make, message", [
    ("labels_without_classnames", "its samples have .cls labels but there is no .*classnames.txt"),
    ("nothing", "no such folder"),
    ("not_a_dataset", "neither CLIP_benchmark's layout .* nor an ImageFolder"),
])  # fmt: skip
def test_errors_are_one_line_and_exit_2(checkpoint, wds_set, tmp_path, capsys, make, message):
    root = tmp_path / make
    if make == "labels_without_classnames":
        (root / "test").mkdir(parents=True)
        fx.write_tar(str(root / "test" / "0.tar"), [("0.jpg", wds_set[1][0]), ("0.cls", b"0")])
    elif make == "not_a_dataset":
        root.mkdir()
        (root / "readme.txt").write_text("hello")
    out = tmp_path / "results.json"
    assert evaluate_mod.main(["--checkpoint", checkpoint, "--datasets", str(root), "--output_file", str(out),
                              "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m apply.evaluate: error: --datasets ")
    assert re.search(message, err), err
    assert not out.exists()


def test_the_trainers_eval_layout_gives_the_same_figures(checkpoint, wds_set, tmp_path):
    """The trainer's eval set (tars, or one tar, beside classnames.txt) reads as CLIP_benchmark's layout does."""
    root, *_ = wds_set
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (flat / name).write_bytes((Path(root) / name).read_bytes())
    for tar in ("0.tar", "1.tar"):
        (flat / tar).write_bytes((Path(root) / "test" / tar).read_bytes())
    results = {}
    for dataset in (root, str(flat), str(flat / "0.tar")):
        out = tmp_path / f"{len(results)}.json"
        assert evaluate_mod.main(["--checkpoint", checkpoint, "--datasets", dataset, "--output_file", str(out),
                                  "--batch_size", "4", "--device", "cpu"]) == 0  # fmt: skip
        results[dataset] = json.loads(out.read_text())
    assert [r["metrics"] for r in results[str(flat)]] == [r["metrics"] for r in results[root]]
    one_tar = results[str(flat / "0.tar")][0]
    assert one_tar["task"] == "zeroshot_classification" and 0 < one_tar["samples"] < results[root][0]["samples"]
