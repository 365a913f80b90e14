"""Where a trained model is applied: load it once, turn images and texts into embeddings.

Every command of ``apply/`` (classify, embed, search, eval, export) loads its model
here and encodes through ``encode_images`` / ``encode_texts``, so an embedding means the
same thing wherever it was made: L2-normalised float32 rows, images decoded exactly as
the trainer decodes them (``train.data.decode_image``: short side to the model's size,
centre crop) and normalised with the model's own mean and std.

``load`` takes

* a webclip checkpoint: a ``step_*.pt`` file, or a run's checkpoint folder (its latest);
  the model name and image size are read from the file;
* any open_clip weights file (``.pt``, ``.bin``, ``.safetensors``) with ``model`` (an
  open_clip name), and ``model_config`` (an open_clip JSON) for an architecture open_clip
  does not ship. Weights are read from the path given, never downloaded;
* a folder in open_clip's hub format (``open_clip_config.json`` and weights, what
  ``python -m apply.export`` writes), loaded as ``open_clip`` loads ``local-dir:`` folders.

Paths may be local or ``s3://``.
"""

from __future__ import annotations

import os
import pickle
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME

from core import storage
from core.errors import ConfigError, DataError
from train import checkpoint as ckpt
from train import data as data_mod
from train import model as model_mod

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class Model:
    """A model in eval mode on its device, with what a caller needs to feed it."""

    module: torch.nn.Module
    tokenizer: Any  # list[str] -> int64 (B, context_length)
    name: str  # open_clip model name
    image_size: int
    path: str  # the weights file that was read
    step: int | None  # the training step of a webclip checkpoint
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def embed_dim(self) -> int:
        return int(self.module.visual.output_dim)

    # -- encoders -------------------------------------------------------------------------

    def decode(self, data: bytes) -> torch.Tensor:
        """Image bytes -> uint8 (3, S, S) as the trainer decodes them; raises ``train.data.SkipSample``."""
        return data_mod.decode_image(data, self.image_size)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> L2-normalised float32 (B, D) on the CPU."""
        batch = model_mod.normalise(images.to(self.device), self.mean, self.std)
        features = self.module.encode_image(batch)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> L2-normalised float32 (B, D) on the CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        features = self.module.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @property
    def logit_scale(self) -> float:
        return float(self.module.logit_scale.exp().item())


def _is_webclip(path: str) -> bool:
    """A run's checkpoint folder, or a ``.pt`` file the trainer wrote (it names its model)."""
    if not path.endswith(WEIGHT_SUFFIXES):
        return True  # a folder: train.checkpoint.model_file finds its latest or says why not
    if not path.endswith(".pt"):
        return False
    with storage.open_file(path, "rb") as handle:
        saved = torch.load(handle, map_location="cpu", weights_only=True, mmap=False)
    return isinstance(saved, dict) and "state_dict" in saved and "model_name" in saved


def is_export(path: str) -> bool:
    """A folder in open_clip's hub format (``open_clip_config.json`` beside its weights)."""
    return not path.endswith(WEIGHT_SUFFIXES) and storage.exists(storage.join(path, HF_CONFIG_NAME))


def _load_export(folder: str, device: torch.device) -> tuple[torch.nn.Module, Any, str, str, int | None]:
    """(module, tokenizer, name, weights path, step) of an exported folder, read by open_clip's ``local-dir:``."""
    names = [posixpath.basename(p) for p in storage.list_files(folder)]
    weights = sorted(n for n in names if n.endswith((".safetensors", ".bin", ".pth")))
    if not weights:
        raise DataError(f"--checkpoint {folder}: {HF_CONFIG_NAME} but no weights (.safetensors, .bin) beside it")
    meta = storage.read_json(storage.join(folder, HF_CONFIG_NAME)).get("webclip") or {}
    with tempfile.TemporaryDirectory() as copy:
        local = folder
        if not storage.is_local(folder):  # open_clip reads a local folder: copy the files (tokenizer included)
            local = copy
            for name in names:
                with storage.open_file(storage.join(folder, name), "rb") as src, open(os.path.join(copy, name), "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
        module = open_clip.create_model(f"local-dir:{local}", device=device).eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{local}")
    step = meta.get("step")
    name = meta.get("model_name") or f"local-dir:{folder}"
    return module, tokenizer, name, storage.join(folder, weights[0]), step if isinstance(step, int) else None


def _local_copy(path: str) -> tuple[str, bool]:
    """open_clip reads a local path; an ``s3://`` file is copied to a temporary one first."""
    if "://" not in path:
        return path, False
    suffix = os.path.splitext(path)[1]
    handle, local = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(handle, "wb") as out, storage.open_file(path, "rb") as src:
        while chunk := src.read(1 << 24):
            out.write(chunk)
    return local, True


def load(
    checkpoint: str,
    *,
    model: str | None = None,
    model_config: str | None = None,
    device: str | torch.device = "cpu",
) -> Model:
    """The model ``checkpoint`` holds, in eval mode on ``device``; see the module docstring."""
    if model_config:
        if not storage.exists(model_config):
            raise DataError(f"--model_config {model_config}: no such file")
        registered = model_mod.register_model_config(model_config)
        model = model or registered
    if not checkpoint:
        raise ConfigError("--checkpoint is required: a webclip checkpoint (file or folder) or open_clip weights")
    if not storage.exists(checkpoint):
        raise DataError(f"--checkpoint {checkpoint}: no such file or folder")
    device = torch.device(device)
    if is_export(checkpoint):
        try:
            module, tokenizer, name, path, step = _load_export(checkpoint, device)
        except (ValueError, RuntimeError, OSError) as exc:
            raise DataError(f"--checkpoint {checkpoint}: cannot load this open_clip folder: {exc}") from None
        mean, std = model_mod.normaliser(module, device)
        return Model(module, tokenizer, name, model_mod.image_size_of(module), path, step, device, mean, std)
    webclip = _is_webclip(checkpoint)
    if not webclip and not model:
        raise ConfigError(
            f"--checkpoint {checkpoint} is not a webclip checkpoint: name its architecture with "
            "--model (an open_clip name) or --model_config (an open_clip JSON)"
        )
    if not webclip and model not in model_mod.model_names():
        raise ConfigError(f"--model {model}: unknown to open_clip; give its JSON with --model_config")
    try:
        if webclip:
            loaded = ckpt.load_model(checkpoint, name=model, device=device)
            module, tokenizer, name, path, step = loaded.model, loaded.tokenizer, loaded.name, loaded.path, loaded.step
        else:
            local, temporary = _local_copy(checkpoint)
            try:
                module = model_mod.create_model(model, pretrained=local, device=device).eval()
            finally:
                if temporary:
                    os.unlink(local)
            tokenizer, name, path, step = model_mod.tokenizer_for(model), model, checkpoint, None
    except FileNotFoundError as exc:
        raise DataError(str(exc).strip('"')) from None
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # another model's file, a broken one
        raise DataError(f"--checkpoint {checkpoint}: cannot load it: {exc}") from None
    mean, std = model_mod.normaliser(module, device)
    return Model(module, tokenizer, name, model_mod.image_size_of(module), path, step, device, mean, std)


def open_clip_names() -> list[str]:
    """Every architecture name ``load(model=...)`` accepts (open_clip's and ours)."""
    return sorted(open_clip.list_models())
