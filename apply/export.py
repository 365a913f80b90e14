"""A checkpoint -> a folder in open_clip's hub format: ``python -m apply.export`` (``make export``).

The folder (local or ``s3://``) holds what ``open_clip.create_model_from_pretrained("local-dir:" + D)``
and ``open_clip.get_tokenizer("local-dir:" + D)`` read, and nothing of webclip is needed to load it:

* ``open_clip_model.safetensors``: the weights (open_clip's state-dict names);
* tokenizer files, for a model whose text tower uses a Hugging Face tokenizer;
* ``open_clip_config.json``, written last (a reader never sees a folder without weights):
  ``model_cfg`` (the full architecture: our names are only registered configs, so the JSON
  is copied in, with the image size the checkpoint was trained at), ``preprocess_cfg``
  (the mean and std the model was trained with; shortest-side resize, centre crop, bicubic:
  the trainer's decode) and ``webclip`` (the model name, step and checkpoint it came from).

``apply.model.load`` (so ``--checkpoint D`` of every apply command) reads such a folder too.
``--push_to_hub ORG/NAME`` then uploads the folder with ``huggingface_hub`` (network and a
token: ``huggingface-cli login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

import open_clip
import safetensors.torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from apply import model as apply_model
from apply.options import ModelOptions
from core.cli import run
from core import storage
from core.config import ConfigError, DataError, option, parse_config, problem, require

DESCRIPTION = "Export a checkpoint as a folder in open_clip's hub format (open_clip_config.json + safetensors)."
EPILOG = """\
examples:
  python -m apply.export --checkpoint runs/demo/checkpoints --output_folder exports/webclip-demo
  python -m apply.export --checkpoint C --output_folder exports/mine --push_to_hub my-org/webclip-mine

load it in plain open_clip (no webclip needed):
  model, preprocess = open_clip.create_model_from_pretrained("local-dir:exports/webclip-demo")
  tokenizer = open_clip.get_tokenizer("local-dir:exports/webclip-demo")

--push_to_hub needs network access and a Hugging Face token (huggingface-cli login, or HF_TOKEN).
"""


@dataclass
class ExportConfig(ModelOptions):
    output_folder: str = option("", "the folder to write (local or s3://)")
    overwrite: bool = option(False, "replace an export already in output_folder")
    push_to_hub: str = option("", "then upload the folder to this Hugging Face repo (ORG/NAME; needs network and "
                                  "a token: huggingface-cli login or HF_TOKEN); output_folder must be local")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "output_folder")
        if self.push_to_hub and not storage.is_local(self.output_folder):
            problem(f"push_to_hub={self.push_to_hub!r}: needs a local output_folder, not {self.output_folder!r}")


def model_config(model: apply_model.Model, checkpoint: str) -> dict:
    """The full open_clip architecture of ``model`` (an exported folder's own, else the registered JSON)."""
    if apply_model.is_export(checkpoint):
        return storage.read_json(storage.join(checkpoint, HF_CONFIG_NAME))["model_cfg"]
    config = open_clip.get_model_config(model.name)
    if config is None:
        raise DataError(f"--checkpoint {checkpoint}: open_clip has no config for {model.name!r}; give --model_config")
    config["vision_cfg"]["image_size"] = model.image_size
    return config


def export(cfg: ExportConfig) -> dict:
    """Write the folder (see the module docstring); returns its ``open_clip_config.json``."""
    config_path = storage.join(cfg.output_folder, HF_CONFIG_NAME)
    if storage.exists(config_path) and not cfg.overwrite:
        raise ConfigError(f"output_folder={cfg.output_folder!r}: holds an export already; --overwrite true to replace it")
    model = cfg.load()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    with storage.atomic_write(storage.join(cfg.output_folder, HF_SAFE_WEIGHTS_NAME), "wb") as handle:
        handle.write(safetensors.torch.save(weights))
    if hasattr(model.tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: its files travel with the model
        with tempfile.TemporaryDirectory() as local:
            model.tokenizer.save_pretrained(local)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as src, storage.atomic_write(
                    storage.join(cfg.output_folder, name), "wb"
                ) as dst:
                    dst.write(src.read())
    preprocess = getattr(model.module.visual, "preprocess_cfg", None) or {}  # what apply.model normalises with
    architecture = model_config(model, cfg.checkpoint)
    if "logit_bias" in weights:  # a SigLIP model: open_clip makes the parameter only when told to
        architecture.setdefault("init_logit_bias", float(weights["logit_bias"]))
    hub_config = {
        "model_cfg": architecture,
        "preprocess_cfg": {"mean": list(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                           "std": list(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
                           "interpolation": "bicubic", "resize_mode": "shortest"},  # fmt: skip
        "webclip": {"model_name": model.name, "step": model.step, "checkpoint": model.path},
    }
    storage.write_json(config_path, hub_config)  # last: the folder's commit marker
    return hub_config


def push(folder: str, repo: str) -> str:
    """Upload ``folder`` to the Hugging Face repo ``repo`` (created if needed); returns the commit's URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("push_to_hub: needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="webclip export")
    except Exception as exc:  # noqa: BLE001 - network, token, permissions: said in one line
        raise DataError(f"push_to_hub={repo!r}: {type(exc).__name__}: {exc} (the export in {folder} is complete)")
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    prog = "python -m apply.export"
    cfg = parse_config(ExportConfig, argv, prog=prog, description=DESCRIPTION, epilog=EPILOG)

    def body() -> int:
        config = export(cfg)
        source = config["webclip"]
        print(f"exported {source['model_name']} (step {source['step']}) from {source['checkpoint']} to "
              f"{cfg.output_folder}")  # fmt: skip
        print(f'load it: open_clip.create_model_from_pretrained("local-dir:{cfg.output_folder}")')
        if cfg.push_to_hub:
            print(f"pushed to the hub: {push(cfg.output_folder, cfg.push_to_hub)}")
        return 0

    return run(prog, body)


if __name__ == "__main__":
    sys.exit(main())
