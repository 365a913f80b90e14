"""apply.export: a folder plain open_clip loads (in a process that never imports webclip) with the same embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from apply import export as export_mod
from apply import model as apply_model
from tests import _train_fixtures as fx
from train import checkpoint as ckpt
from train import model as model_mod

TEXTS = ["a red circle", "a photo of a blue square."]

# Run in a fresh interpreter outside the repository: only open_clip, no webclip configs registered.
PLAIN_OPEN_CLIP = """
import sys, numpy as np, torch, open_clip
folder, images = sys.argv[1], np.load(sys.argv[2])
model, preprocess = open_clip.create_model_from_pretrained("local-dir:" + folder)
model.eval()  # as open_clip's README does: BatchNorm in eval mode
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
with torch.no_grad():
    image = model.encode_image((torch.from_numpy(images).float() / 255 - mean) / std, normalize=True)
    text = model.encode_text(tokenizer(sys.argv[4:]), normalize=True)
np.savez(sys.argv[3], image=image.numpy(), text=text.numpy(), size=model.visual.image_size)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(2)
    module = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(11, 0, 0), "webclip-tiny", model_mod.image_size_of(module), {})
    return folder


def test_plain_open_clip_loads_the_export_and_gives_our_embeddings(checkpoint, tmp_path, capsys):
    folder = str(tmp_path / "export")
    assert export_mod.main(["--checkpoint", checkpoint, "--output_folder", folder, "--device", "cpu"]) == 0
    assert sorted(os.listdir(folder)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.load(open(os.path.join(folder, "open_clip_config.json")))
    assert config["model_cfg"] == json.load(open(model_mod.MODEL_CONFIG_DIR / "webclip-tiny.json"))  # the whole JSON
    assert config["webclip"] == {"model_name": "webclip-tiny", "step": 11, "checkpoint": ckpt.model_file(checkpoint)}
    assert 'create_model_from_pretrained("local-dir:' in capsys.readouterr().out

    ours = apply_model.load(checkpoint)
    jpegs = [jpeg for jpeg, _, _ in fx.eval_samples(per_class=1)][:3]
    images = torch.stack([ours.decode(j) for j in jpegs])
    np.save(tmp_path / "images.npy", images.numpy())
    subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, folder, str(tmp_path / "images.npy"),
                    str(tmp_path / "plain.npz"), *TEXTS], check=True, cwd=tmp_path,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    plain = np.load(tmp_path / "plain.npz")
    assert int(plain["size"][0] if plain["size"].ndim else plain["size"]) == ours.image_size
    np.testing.assert_allclose(plain["image"], ours.encode_images(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(plain["text"], ours.encode_texts(TEXTS).numpy(), atol=1e-5)

    # apply.model reads the exported folder too (so --checkpoint EXPORT works in every apply command).
    again = apply_model.load(folder)
    assert (again.name, again.step, again.image_size) == ("webclip-tiny", 11, ours.image_size)
    assert again.path == os.path.join(folder, "open_clip_model.safetensors")
    torch.testing.assert_close(again.encode_images(images), ours.encode_images(images), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again.encode_texts(TEXTS), ours.encode_texts(TEXTS), atol=1e-6, rtol=1e-6)

    # A second export into the same folder is refused (one line, exit 2) unless --overwrite.
    assert export_mod.main(["--checkpoint", checkpoint, "--output_folder", folder, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an export already; --overwrite true" in err
    assert export_mod.main(["--checkpoint", folder, "--output_folder", str(tmp_path / "re"), "--device", "cpu"]) == 0
    assert json.load(open(tmp_path / "re" / "open_clip_config.json"))["model_cfg"] == config["model_cfg"]


@pytest.mark.integration
def test_export_to_s3_and_load_from_there(checkpoint, s3_env):
    folder = "s3://webclip/exports/tiny"
    assert export_mod.main(["--checkpoint", checkpoint, "--output_folder", folder, "--device", "cpu"]) == 0
    loaded = apply_model.load(folder)
    torch.testing.assert_close(loaded.encode_texts(TEXTS), apply_model.load(checkpoint).encode_texts(TEXTS))


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert export_mod.main(["--checkpoint", str(tmp_path / "nowhere.pt"), "--output_folder", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint" in err and "no such file" in err
    assert not (tmp_path / "x").exists()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "open_clip_config.json").write_text('{"model_cfg": {}}')
    with pytest.raises(apply_model.DataError, match="no weights"):
        apply_model.load(str(tmp_path / "half"))
    with pytest.raises(SystemExit):
        export_mod.main(["--checkpoint", "c", "--output_folder", "s3://b/x", "--push_to_hub", "org/name"])
    assert "push_to_hub='org/name': needs a local output_folder" in capsys.readouterr().err


def test_a_siglip_checkpoint_exports_with_its_logit_bias(tmp_path):
    """A SigLIP model's ``logit_bias`` exists in open_clip only when its config says so: the export says so."""
    folder = str(tmp_path / "run" / "checkpoints")
    torch.manual_seed(3)
    module = model_mod.create_model("webclip-tiny", siglip=True)
    with torch.no_grad():
        module.logit_bias.fill_(-7.5)
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(4, 0, 0), "webclip-tiny", model_mod.image_size_of(module), {})
    out = str(tmp_path / "export")
    assert export_mod.main(["--checkpoint", folder, "--output_folder", out, "--device", "cpu"]) == 0
    assert json.load(open(os.path.join(out, "open_clip_config.json")))["model_cfg"]["init_logit_bias"] == -7.5
    loaded, _ = open_clip.create_model_from_pretrained("local-dir:" + out)
    assert loaded.logit_bias.item() == -7.5
