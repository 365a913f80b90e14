"""apply.model: one loader for webclip checkpoints and open_clip weights files, one encoder."""

from __future__ import annotations

import open_clip
import pytest
import torch

from apply import model as apply_model
from core.errors import ConfigError, DataError
from tests import _train_fixtures as fixtures
from train import checkpoint as ckpt
from train import model as model_mod
from train.data import decode_image


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    folder = str(tmp_path_factory.mktemp("run") / "checkpoints")
    torch.manual_seed(0)
    module = model_mod.create_model("webclip-tiny")
    ckpt.save_checkpoint(folder, module, ckpt.TrainProgress(5, 0, 0), "webclip-tiny", model_mod.image_size_of(module), {})
    return folder, module


def _open_clip_reference(module: torch.nn.Module, jpeg: bytes, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's own encoders on the trainer's decode, normalised by hand."""
    image = decode_image(jpeg, model_mod.image_size_of(module)).unsqueeze(0)
    mean, std = model_mod.normaliser(module, torch.device("cpu"))
    with torch.no_grad():
        img = module.eval().encode_image(((image.float() / 255.0) - mean) / std)
        txt = module.encode_text(open_clip.get_tokenizer("webclip-tiny")([text]))
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def test_a_run_folder_loads_its_latest_and_encodes_like_open_clip(run_folder):
    folder, module = run_folder
    loaded = apply_model.load(folder)
    assert (loaded.name, loaded.step, loaded.image_size) == ("webclip-tiny", 5, model_mod.image_size_of(module))
    jpeg, caption, _ = fixtures.train_sample(0, 0, 0.0)
    images = loaded.encode_images(loaded.decode(jpeg).unsqueeze(0))
    texts = loaded.encode_texts([caption])
    ref_img, ref_txt = _open_clip_reference(module, jpeg, caption)
    assert images.shape == (1, loaded.embed_dim) and texts.shape == (1, loaded.embed_dim)
    torch.testing.assert_close(images, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(texts, ref_txt, atol=1e-5, rtol=1e-5)
    assert torch.allclose(images.norm(dim=-1), torch.ones(1))


def test_an_open_clip_weights_file_needs_its_model_name(run_folder, tmp_path):
    folder, module = run_folder
    weights = str(tmp_path / "open_clip_model.bin")
    torch.save(module.state_dict(), weights)  # open_clip's own layout: a bare state dict
    with pytest.raises(ConfigError, match="--model"):
        apply_model.load(weights)
    loaded = apply_model.load(weights, model="webclip-tiny")
    assert loaded.step is None and loaded.name == "webclip-tiny"
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(loaded.encode_texts(texts), apply_model.load(folder).encode_texts(texts))


def test_missing_and_foreign_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        apply_model.load(str(tmp_path / "nowhere.pt"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(DataError, match="latest.json"):
        apply_model.load(str(empty))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load"):
        apply_model.load(str(junk), model="webclip-tiny")
    with pytest.raises(ConfigError, match="unknown to open_clip"):
        apply_model.load(str(junk), model="no-such-arch")
