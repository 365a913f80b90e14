"""Checkpoints that open_clip loads as they are, with our training state beside them.

For step ``N`` in the checkpoint folder (local or ``s3://``):

* ``step_{N:08d}.pt`` — ``{"state_dict": ..., "model_name": ..., "step": N, ...}``:
  what ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads
  (its ``load_state_dict`` takes the ``state_dict`` entry; every other entry is a
  plain int/str so ``torch.load(weights_only=True)`` accepts the file). Our model
  names are known to open_clip once ``train.model`` is imported (or after
  ``open_clip.add_model_config("train/model_configs")``); a run with
  ``model.image_size`` set needs the same ``force_image_size`` when loading;
* ``step_{N:08d}.state.pt`` — what a resume needs and an open_clip user does not: the
  optimizer and grad scaler, the schedule's inputs, step and samples seen, and per rank
  the data readers' positions, skip counts and RNG states (all plain tensors, numbers
  and lists, so it too loads with ``weights_only=True``: no pickled code);
* ``latest.json`` — names the two files above and the step; written last, so a reader
  that follows it never finds a half-written checkpoint. Each file is itself written
  atomically: a temporary name then a rename on local disk, one PUT per object on S3.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import yaml

from core import storage
from train import model as model_mod

LATEST = "latest.json"
STATE_SUFFIX = ".state.pt"


@dataclass(frozen=True)
class TrainProgress:
    step: int
    samples_seen: int
    epoch: int  # the epoch rank 0's first data reader was in


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with storage.atomic_write(path, "wb", size=len(data)) as handle:
        handle.write(data)


def _load(path: str) -> Any:
    with storage.open_file(path, "rb") as handle:
        data = handle.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# -- RNG state -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain tensors and lists (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save ------------------------------------------------------------------------------------


class NonFiniteWeights(RuntimeError):
    """A model with NaN or infinite weights is never saved (exit 1)."""


def save_checkpoint(
    folder: str,
    model: torch.nn.Module,
    progress: TrainProgress,
    model_name: str,
    image_size: int,
    state: dict[str, Any],
) -> str:
    """Write model, training state and (last) the ``latest`` pointer; returns the model file's path.

    ``model`` is the bare model (not the DDP or compiled wrapper), so keys carry no prefix.
    ``state`` is everything else a resume needs (see the module docstring).
    """
    name = f"step_{progress.step:08d}"
    model_path = storage.join(folder, f"{name}.pt")
    state_path = storage.join(folder, f"{name}{STATE_SUFFIX}")
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}  # not channels-last:
    # safetensors (open_clip's hub format) refuses strided tensors
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # never a checkpoint a resume or an export would carry the damage from
        raise NonFiniteWeights(f"not saving {model_path}: non-finite weights in {', '.join(broken[:5])}"
                               f"{' …' if len(broken) > 5 else ''}; the last checkpoint in {folder} is kept")
    _write(
        model_path,
        _to_bytes(
            {"state_dict": weights, "model_name": model_name, "image_size": image_size, "step": progress.step}
        ),
    )
    _write(state_path, _to_bytes({**state, "progress": asdict(progress)}))
    storage.write_json(
        storage.join(folder, LATEST),
        {"checkpoint": f"{name}.pt", "state": f"{name}{STATE_SUFFIX}", **asdict(progress), "model_name": model_name},
    )
    return model_path


# -- find and load -----------------------------------------------------------------------------


def latest_checkpoint(folder: str) -> str | None:
    """Path of the newest complete model checkpoint in ``folder``, or None."""
    pointer = storage.join(folder, LATEST)
    if not storage.exists(pointer):
        return None
    return storage.join(folder, storage.read_json(pointer)["checkpoint"])


def resolve_resume(resume: str, checkpoint_dir: str) -> str | None:
    """The model file to resume from: ``"latest"`` (None if the folder has none yet), a folder, or a file.

    Raises ``FileNotFoundError`` naming the path when an explicit path does not exist.
    """
    if resume == "latest":
        return latest_checkpoint(checkpoint_dir)
    path = resume
    if path.endswith(STATE_SUFFIX):
        path = path[: -len(STATE_SUFFIX)] + ".pt"
    if not path.endswith(".pt"):  # a folder holding latest.json
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"resume={resume!r}: no {LATEST} in that folder")
        return found
    if not storage.exists(path):
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint")
    return path


def load_checkpoint(model_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model file contents, training state) of the checkpoint whose model file is ``model_path``."""
    state_path = model_path[: -len(".pt")] + STATE_SUFFIX
    if not storage.exists(state_path):
        raise FileNotFoundError(f"{model_path}: its training state {state_path} is missing; cannot resume exactly")
    return _load(model_path), _load(state_path)


# -- load for inference (scoring, evaluation outside the trainer) ------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model in eval mode, with what a caller needs to feed it."""

    model: torch.nn.Module
    tokenizer: Any  # open_clip's: list[str] -> int64 (B, context_length)
    name: str  # open_clip model name
    image_size: int
    path: str  # the model file that was read
    step: int | None


def model_file(path: str) -> str:
    """The model file ``path`` names: a ``step_*.pt`` file, or a checkpoint folder's latest one."""
    if path.endswith(STATE_SUFFIX):
        path = path[: -len(STATE_SUFFIX)] + ".pt"
    if path.endswith(".pt"):
        if not storage.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r}: no such file")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"checkpoint {path!r}: neither a .pt file nor a folder holding {LATEST}")
    return found


def _register_run_model_config(model_path: str) -> bool:
    """Register the ``model.config_file`` of the run that wrote ``model_path``, if it can be found.

    The trainer's default layout is ``{run_dir}/checkpoints/step_*.pt`` beside
    ``{run_dir}/config.yaml``; a custom architecture is known only from that file.
    """
    run_dir = model_path.rsplit("/", 2)[0] if model_path.count("/") >= 2 else "."
    config_path = storage.join(run_dir, "config.yaml")
    if not storage.exists(config_path):
        return False
    with storage.open_file(config_path, "r") as handle:
        config = yaml.safe_load(handle) or {}
    config_file = (config.get("model") or {}).get("config_file") if isinstance(config, dict) else None
    if not config_file or not storage.exists(config_file):
        return False
    model_mod.register_model_config(config_file)
    return True


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns (on the root logger) that a model without ``pretrained`` is random."""
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def load_model(
    path: str,
    *,
    name: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The model of checkpoint ``path`` (a ``.pt`` file or a checkpoint folder), in eval mode.

    The model name and image size come from the file (the trainer stores both); ``name``
    and ``image_size`` override them (needed only for model files written elsewhere). An
    architecture registered from a JSON file during training is found through the run's
    ``config.yaml`` when the checkpoint sits in ``{run_dir}/checkpoints``.
    """
    path = model_file(path)
    saved = _load(path)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ValueError(f"checkpoint {path!r}: not a webclip model file (no 'state_dict' entry)")
    name = name or saved.get("model_name")
    if not name:
        raise ValueError(f"checkpoint {path!r} does not name its model; pass the open_clip model name")
    if name not in model_mod.model_names() and not _register_run_model_config(path):
        raise ValueError(
            f"checkpoint {path!r}: model {name!r} is unknown to open_clip and the run's config.yaml does not "
            "name its JSON; register it first (train.model.register_model_config)"
        )
    image_size = image_size or saved.get("image_size")
    with _no_random_init_warning():  # the weights are loaded right after
        model = model_mod.create_model(name, image_size=image_size, device="cpu",
                                       siglip="logit_bias" in saved["state_dict"])  # fmt: skip
    model.load_state_dict(saved["state_dict"])
    del saved["state_dict"]
    model = model.to(device).eval()
    step = saved.get("step")
    return LoadedModel(
        model, model_mod.tokenizer_for(name), name, model_mod.image_size_of(model), path,
        step if isinstance(step, int) else None,
    )  # fmt: skip
