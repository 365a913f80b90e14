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
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch

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
) -> torch.nn.Module:
    """An open_clip CLIP model: random init, or weights from a local checkpoint file."""
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, force_image_size=image_size, device=device
    )
    return model


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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
