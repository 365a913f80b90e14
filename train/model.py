"""Model construction through open_clip, so every checkpoint we write is open_clip's.

Our own architectures are open_clip JSON configs in ``train/model_configs/``; they are
registered with ``open_clip.add_model_config`` on import, after which any open_clip
tool (``create_model_and_transforms(name, pretrained=path)``, ``get_tokenizer(name)``)
knows them by name. Weights are never downloaded: models start from random init.

``webclip-tiny`` is sized for the 2-core CPU demo: open_clip's ModifiedResNet image
tower (width 16, one bottleneck per stage) at 48 px, and a 2-layer, 128-wide text
transformer with a 16-token context (open_clip's tokenizer takes the context length
from ``text_cfg``); why this and not a ViT: BENCHMARKS.md, "Training on the demo corpus".

Images travel as uint8 from the shard to here; ``normalise`` turns them into the
model's input on the device (4x fewer bytes through the DataLoader and to the GPU).

``pretrained_state_dict`` reads weights to fine-tune from: an open_clip weights file or
an exported hub-format folder, local or s3://.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import open_clip
import torch

from core import storage
from core.errors import DataError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

_registered: set[str] = set()


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip model JSON (file or folder); returns the name of a file's model."""
    path = Path(path)
    if str(path) not in _registered:
        open_clip.add_model_config(path)
        _registered.add(str(path))
    return path.stem


register_model_config(MODEL_CONFIG_DIR)


def model_names() -> list[str]:
    return open_clip.list_models()


def create_model(
    name: str,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    siglip: bool = False,
    **open_clip_kwargs,
) -> torch.nn.Module:
    """An open_clip CLIP model: random init, or weights from a local checkpoint file.

    ``siglip``: with a learnable ``logit_bias``, and open_clip's SigLIP init (logit scale
    log 10, bias -10). ``open_clip_kwargs`` go to ``create_model_and_transforms`` as they are
    (e.g. ``force_patch_dropout``).
    """
    extra = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0} if siglip else {}
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, force_image_size=image_size, device=device, **extra, **open_clip_kwargs
    )
    return model


HUB_CONFIG, HUB_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def pretrained_weights_file(path: str) -> str:
    """The weights file ``model.pretrained`` names (a folder's ``HUB_WEIGHTS``); ``DataError`` if missing."""
    if path.endswith(WEIGHT_SUFFIXES):
        if not storage.exists(path):
            raise DataError(f"model.pretrained={path!r}: no such file")
        return path
    for name in (HUB_CONFIG, HUB_WEIGHTS):
        if not storage.exists(storage.join(path, name)):
            raise DataError(f"model.pretrained={path!r}: not a weights file ({', '.join(WEIGHT_SUFFIXES)}) "
                            f"and no {name} in it as a folder")  # fmt: skip
    return storage.join(path, HUB_WEIGHTS)


def pretrained_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a weights file or an exported folder (``HUB_CONFIG`` + ``HUB_WEIGHTS``).

    A file is a safetensors file or a ``torch.save``d state dict, bare or under
    ``state_dict`` (read with ``weights_only=True``); DDP's ``module.`` prefix is dropped.
    Raises ``DataError`` naming what is missing.
    """
    path = pretrained_weights_file(path)
    with storage.open_file(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        state = load(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"model.pretrained={path!r}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Load ``pretrained_state_dict(path)`` into ``model``: every weight, names and shapes as they are.

    Only SigLIP's ``logit_bias`` may be on one side alone: a CLIP-loss model drops it, a
    SigLIP model without one in the file keeps its initial bias.
    """
    state = pretrained_state_dict(path)
    own = model.state_dict()
    if "logit_bias" not in own:
        state.pop("logit_bias", None)
    elif "logit_bias" not in state:
        state["logit_bias"] = own["logit_bias"]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise DataError(
            f"model.pretrained={path!r} does not fit the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]} (is model.name / model.image_size the same?)"
        )
    model.load_state_dict(state)


def tokenizer_for(name: str):
    """open_clip's tokenizer, with the context length from the model's ``text_cfg``."""
    return open_clip.get_tokenizer(name)


def image_size_of(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def normaliser(model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) shaped for NCHW images in [0, 1], from the model's preprocess config."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    shape = (1, 3, 1, 1)
    return (
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
    )


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float32, on whatever device ``images`` is on."""
    return (images.float().div_(255.0) - mean) / std


def tower_of(parameter_name: str) -> str | None:
    """``image`` or ``text`` for a parameter of open_clip's CLIP / CustomTextCLIP; None for the logit scale and bias."""
    if parameter_name.startswith("visual."):
        return "image"
    if parameter_name.startswith("logit_"):
        return None
    return "text"


def lock_towers(model: torch.nn.Module, image: bool, text: bool) -> None:
    """Freeze whole towers (LiT): their parameters get no gradients (``train_mode`` keeps their statistics)."""
    for name, param in model.named_parameters():
        if (image and tower_of(name) == "image") or (text and tower_of(name) == "text"):
            param.requires_grad_(False)


def train_mode(model: torch.nn.Module, lock_image: bool, lock_text: bool) -> None:
    """Training mode, but a locked tower in eval mode (BatchNorm statistics and dropout as in inference)."""
    model.train()
    if lock_image:
        model.visual.eval()
    if lock_text:
        for name in ("text", "transformer", "token_embedding", "ln_final"):
            module = getattr(model, name, None)
            if isinstance(module, torch.nn.Module):
                module.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
