"""Checkpoints that open_clip loads as they are, with our training state beside them.

For step ``N`` in the checkpoint folder (local or ``s3://``):

* ``step_{N:08d}.pt`` — ``{"state_dict": ..., "model_name": ..., "step": N, ...}``:
  what ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads
  (its ``load_state_dict`` takes the ``state_dict`` entry; every other entry is a
  plain int/str so ``torch.load(weights_only=True)`` accepts the file). Our model
  names are known to open_clip once ``train.model`` is imported (or after
  ``open_clip.add_model_config("train/model_configs")``); a run with
  ``model.image_size`` set needs the same ``force_image_size`` when loading;
* ``step_{N:08d}.state.pt`` — optimizer, step, samples seen, epoch, RNG states: what a
  resume needs and an open_clip user does not;
* ``latest.json`` — names the two files above and the step; written last, so a reader that follows
  it never finds a half-written checkpoint (each file is itself written atomically).
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from core import storage

LATEST = "latest.json"


@dataclass(frozen=True)
class TrainProgress:
    step: int
    samples_seen: int
    epoch: int  # the epoch the data readers were in (approximate under shuffling)


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with storage.atomic_write(path, "wb") as handle:
        handle.write(data)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: TrainProgress,
    model_name: str,
    config: dict[str, Any],
    image_size: int,
) -> str:
    """Write model, training state and the ``latest`` pointer; returns the model file's path.

    ``model`` is the bare model (not the DDP wrapper), so keys carry no ``module.`` prefix.
    """
    name = f"step_{progress.step:08d}"
    model_path = storage.join(folder, f"{name}.pt")
    state_path = storage.join(folder, f"{name}.state.pt")
    weights = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    _write(
        model_path,
        _to_bytes(
            {"state_dict": weights, "model_name": model_name, "image_size": image_size, "step": progress.step}
        ),
    )
    _write(
        state_path,
        _to_bytes(
            {
                "optimizer": optimizer.state_dict(),
                "progress": asdict(progress),
                "rng": rng_state(),
                "config": config,
            }
        ),
    )
    storage.write_json(
        storage.join(folder, LATEST),
        {"checkpoint": f"{name}.pt", "state": f"{name}.state.pt", **asdict(progress), "model_name": model_name},
    )
    return model_path


def latest_checkpoint(folder: str) -> str | None:
    """Path of the newest complete model checkpoint in ``folder``, or None."""
    pointer = storage.join(folder, LATEST)
    if not storage.exists(pointer):
        return None
    return storage.join(folder, storage.read_json(pointer)["checkpoint"])
