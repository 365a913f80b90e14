"""apply.classify: rows against open_clip's own encoders on the same decoded images; inputs, outputs, errors."""

from __future__ import annotations

import os
import re

import open_clip
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from apply import benchmark
from apply import classify as classify_mod
from tests import _train_fixtures as fx
from train import checkpoint as ckpt
from train import model as model_mod
from train.data import decode_image

LABELS = ["red circle", "blue square", "green triangle"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {}", "{c}"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(0)
    module = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(7, 0, 0), "webclip-tiny", model_mod.image_size_of(module), {})
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, list[bytes]]:
    """A folder of 5 JPEGs (two in a sub-folder), a broken one and a text file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    jpegs = [jpeg for jpeg, _, _ in fx.eval_samples(per_class=1)][:5]
    (root / "sub").mkdir()
    for i, jpeg in enumerate(jpegs):
        (root / ("sub" if i >= 3 else "") / f"{i}.jpg").write_bytes(jpeg)
    (root / "2b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return str(root), jpegs


def _reference(checkpoint: str, jpegs: list[bytes], labels: list[str], templates: list[str]) -> torch.Tensor:
    """Label probabilities computed directly with open_clip's loader, encoders and tokenizer."""
    path = ckpt.model_file(checkpoint)
    module, _, _ = open_clip.create_model_and_transforms("webclip-tiny", pretrained=path)
    module.eval()
    tokenizer = open_clip.get_tokenizer("webclip-tiny")
    size = model_mod.image_size_of(module)
    batch = torch.stack([decode_image(j, size) for j in jpegs]).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = module.encode_image((batch - mean) / std)
        image = image / image.norm(dim=-1, keepdim=True)
        classes = []
        for label in labels:
            prompts = [t.replace("{c}", label).replace("{}", label) for t in templates]
            text = module.encode_text(tokenizer(prompts))
            text = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
            classes.append(text / text.norm())
        logits = module.logit_scale.exp() * image @ torch.stack(classes).T
    return logits.softmax(dim=-1)


def test_folder_rows_match_open_clip_with_a_prompt_ensemble(checkpoint, images, tmp_path, capsys):
    root, jpegs = images
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = str(tmp_path / "out.parquet")
    code = classify_mod.main(["--checkpoint", checkpoint, "--images", root, "--labels_file", str(tmp_path / "labels.txt"),
                              "--templates", str(tmp_path / "templates.txt"), "--output_file", out, "--csv", "true",
                              "--top_k", "2", "--batch_size", "2", "--device", "cpu"])  # fmt: skip
    assert code == 0
    rows = pq.read_table(out).to_pylist()
    assert [os.path.relpath(r["image"], root) for r in rows] == ["0.jpg", "1.jpg", "2.jpg", "2b_broken.jpg",
                                                                 "sub/3.jpg", "sub/4.jpg"]  # fmt: skip
    broken = rows.pop(3)
    assert broken["error"] == "decode_error" and broken["label_1"] is None and broken["prob_1"] is None
    expected = _reference(checkpoint, jpegs, LABELS, TEMPLATES)
    for row, probs in zip(rows, expected):
        top = probs.topk(2)
        assert row["error"] is None and row["shard"] is None
        assert [row["label_1"], row["label_2"]] == [LABELS[i] for i in top.indices.tolist()]
        assert [row["prob_1"], row["prob_2"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert set(rows[0]) == {"image", "shard", "label_1", "prob_1", "label_2", "prob_2", "error"}
    csv_rows = pacsv.read_csv(str(tmp_path / "out.csv")).to_pylist()
    assert [r["image"] for r in csv_rows] == [r["image"] for r in pq.read_table(out).to_pylist()]
    printed = capsys.readouterr().out
    assert "6 images (6 shown), 1 not classified, decode_error 1" in printed and "top-1 label counts: " in printed
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary file left


def test_prompt_ensemble_is_the_renormalised_mean():
    """Hand-made embeddings: the class row is mean(normalised prompts), renormalised."""
    vectors = {"a x": [1.0, 0.0], "b x": [0.0, 1.0], "a y": [0.6, 0.8], "b y": [0.6, 0.8]}
    classifier = benchmark.class_embeddings(lambda texts: torch.tensor([vectors[t] for t in texts]),
                                            benchmark.Classes(["x", "y"], ["a {c}", "b {}"]).prompts())  # fmt: skip
    half = 2**-0.5
    assert torch.allclose(classifier, torch.tensor([[half, half], [0.6, 0.8]]))
    openai = classify_mod.read_templates("openai_imagenet")
    assert len(openai) == len(open_clip.OPENAI_IMAGENET_TEMPLATES) and all("{c}" in t for t in openai)
    assert openai[0] == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("{c}")
    config = classify_mod.ClassifyConfig(checkpoint="c", images="i", output_file="o", labels="imagenet")
    assert classify_mod.read_labels(config) == list(open_clip.IMAGENET_CLASSNAMES)
    config = classify_mod.ClassifyConfig(checkpoint="c", images="i", output_file="o", labels=" cat, dog ,,bird")
    assert classify_mod.read_labels(config) == ["cat", "dog", "bird"]


def test_shards_and_a_list_of_files_to_csv(checkpoint, images, tmp_path, capsys):
    root, jpegs = images
    shards = tmp_path / "shards"
    shards.mkdir()
    fx.write_tar(str(shards / "00000.tar"), [("a.jpg", jpegs[0]), ("a.txt", b"x"), ("b.txt", b"no image"),
                                              ("c.jpg", jpegs[1])])  # fmt: skip
    fx.write_tar(str(shards / "00001.tar"), [("d.jpg", jpegs[2])])
    out = str(tmp_path / "shards.csv")
    assert classify_mod.main(["--checkpoint", checkpoint, "--images", str(shards), "--labels", ",".join(LABELS),
                              "--output_file", out, "--device", "cpu"]) == 0  # fmt: skip
    rows = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)).to_pylist()
    assert [(r["image"], os.path.basename(r["shard"]), r["error"]) for r in rows] == [
        ("a", "00000.tar", None), ("b", "00000.tar", "image_missing"), ("c", "00000.tar", None),
        ("d", "00001.tar", None)]  # fmt: skip
    expected = _reference(checkpoint, jpegs[:3], LABELS, [classify_mod.DEFAULT_TEMPLATE])
    assert [r["prob_1"] for r in rows if not r["error"]] == pytest.approx(expected.max(dim=1).values.tolist(), abs=1e-5)
    assert not os.path.exists(tmp_path / "shards.parquet")

    (tmp_path / "list.txt").write_text(f"{root}/sub/3.jpg\nmissing.jpg\n")
    out = str(tmp_path / "list.parquet")
    assert classify_mod.main(["--checkpoint", checkpoint, "--images", str(tmp_path / "list.txt"), "--labels",
                              "cat,dog", "--output_file", out, "--show", "0", "--device", "cpu"]) == 0  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    assert [r["image"] for r in rows] == [f"{root}/sub/3.jpg", str(tmp_path / "missing.jpg")]
    assert rows[1]["error"] == "image_missing" and {rows[0]["label_1"], rows[0]["label_2"]} == {"cat", "dog"}
    assert rows[0]["prob_1"] + rows[0]["prob_2"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/nowhere.pt", "--images", "{images}", "--labels", "a,b"], "--checkpoint .*no such file"),
        (["--images", "{tmp}/empty", "--labels", "a,b"], "--images .*empty: no images"),
        (["--images", "{tmp}/nothing", "--labels", "a,b"], "--images .*nothing: no such file or folder"),
        (["--images", "{images}", "--labels", "a,a"], "labels given twice: a"),
        (["--images", "{images}", "--labels", "a", "--templates", "{tmp}/bad.txt"], "has no {c}"),
    ],
)
def test_errors_are_one_line_and_exit_2(checkpoint, images, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.txt").write_text("a photo\n")
    filled = [a.format(tmp=tmp_path, images=images[0]) if "{" in a and a != "{c}" else a for a in args]
    if "--checkpoint" not in filled:
        filled = ["--checkpoint", checkpoint] + filled
    out = tmp_path / "out.parquet"
    assert classify_mod.main(filled + ["--output_file", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m apply.classify: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_options_are_reported_together(capsys):
    with pytest.raises(SystemExit) as stop:
        classify_mod.main(["--images", "x", "--labels", "a", "--labels_file", "f", "--top_k", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint: required" in err and "output_file: required" in err and "give exactly one" in err
    assert "top_k=0" in err


def test_tar_input_is_read_as_a_shard(checkpoint, images, tmp_path):
    tar_path = tmp_path / "one.tar"
    fx.write_tar(str(tar_path), [("k.jpg", images[1][0])])
    kind, paths = classify_mod.resolve_inputs(str(tar_path))
    assert (kind, paths) == ("shards", [str(tar_path)])
