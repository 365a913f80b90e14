"""The one typed configuration of a training run: sections of options, loaded by ``core.config``.

Every setting has one declared type, default and help; the whole run is one printable
object (written next to the checkpoints), and the loop never stores runtime state on
it. ``TrainConfig.__post_init__`` checks every value before any model or data is
touched, and names the bad value and what would be valid.

YAML sections nest (``optim: {lr: 1e-3}``); flags and overrides use dotted keys:
``--optim.lr 1e-3``, ``--set optim.lr=1e-3``, ``load_config(path, ["optim.lr=1e-3"])``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from core.config import ConfigError, load, option, problem, to_dict, to_yaml  # noqa: F401 - ConfigError, to_yaml re-exported
from core.device import DEVICES, PRECISIONS

LOSSES = ("clip", "siglip")


@dataclass
class DataConfig:
    train_shards: str = option("", "folder of {n:05d}.tar (+ manifest.json), local or s3://; required")
    resampled: bool = option(False, "draw shards with replacement (seeded), for datasets too large for epochs")
    eval_tar: str | None = option(None, "labelled zero-shot images: a tar or a folder of tars; null = no zero-shot")
    eval_classnames: str | None = option(None, "text file, one class name per line; null = classnames.txt beside "
                                               "eval_tar")
    eval_templates: str | None = option(None, "one prompt per line, {c} for the class name; null = the file beside "
                                              "eval_tar")
    eval_shards: str | None = option(None, "folder of held-out tars for image-text retrieval; null = none")
    eval_max_samples: int = option(5000, "retrieval uses at most this many held-out samples (split over ranks)")
    workers: int = option(1, "DataLoader worker processes per rank (0 = read in the training process)")
    shuffle_buffer: int = option(2000, "samples held for shuffling, per reader (drained at each epoch's end)")
    max_image_pixels: int = option(1 << 26, "images announcing more pixels are skipped (decompression bombs)")


@dataclass
class ModelConfig:
    name: str = option("webclip-tiny", "open_clip model name (train/model_configs/*.json are registered)")
    config_file: str | None = option(None, "extra open_clip model JSON; registered under its file stem")
    image_size: int | None = option(None, "override the model config's image size; null = the config's")
    channels_last: bool = option(True, "NHWC memory layout: faster convolutions on CPU (oneDNN) and GPU")
    grad_checkpointing: bool = option(False, "recompute transformer blocks in backward: less memory, ~30% more "
                                             "compute")
    pretrained: str | None = option(None, "start from these weights: an open_clip weights file (.pt, .bin, "
                                          ".safetensors; a webclip step_*.pt too) or an exported folder "
                                          "(open_clip_config.json + open_clip_model.safetensors), local or "
                                          "s3://; null = random init")
    lock_image: bool = option(False, "freeze the image tower (LiT): no gradients, BatchNorm statistics kept")
    lock_text: bool = option(False, "freeze the text tower: no gradients")
    fast_attention: bool = option(True, "attention through scaled_dot_product_attention with packed QKV "
                                        "(train/fast.py); same parameters and state dict as open_clip's")
    fast_patch_embed: bool = option(True, "a ViT's patch embedding as a reshape and one matrix product")


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(100, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = option(0.0, "cosine decays to lr * min_lr_ratio")
    weight_decay: float = option(0.1, "on weight matrices only; gains, biases, logit scale are not decayed")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-6, "AdamW epsilon")
    grad_clip: float | None = option(None, "max global gradient norm; null = no clipping")
    image_lr: float | None = option(None, "peak learning rate of the image tower (fine-tuning); null = lr")
    text_lr: float | None = option(None, "peak learning rate of the text tower (fine-tuning); null = lr")
    max_nonfinite_steps: int = option(5, "a step whose loss or gradient is not finite is skipped (its samples "
                                         "logged); this many in a row stop the run")


@dataclass
class CheckpointConfig:
    dir: str | None = option(None, "local or s3://; null = {run_dir}/checkpoints")
    every_steps: int = option(0, "also save every N steps; 0 = only at the end")
    sigterm_within_steps: int = option(10, "on SIGTERM (Slurm, Kubernetes): a checkpoint due within this many "
                                           "steps is trained on to, saved, and the run stops (exit 130); one due "
                                           "later: a checkpoint of the current step is saved at once")


@dataclass
class TrainConfig:
    data: DataConfig = option(DataConfig, "the training shards and the evaluation sets")
    model: ModelConfig = option(ModelConfig, "the open_clip model")
    optim: OptimConfig = option(OptimConfig, "the optimizer and the learning-rate schedule")
    checkpoint: CheckpointConfig = option(CheckpointConfig, "where and how often checkpoints are saved")
    batch_size: int = option(256, "global samples per optimizer step, split evenly over ranks and accum_steps")
    accum_steps: int = option(1, "micro-batches per optimizer step; each micro-batch is its own contrastive batch")
    steps: int | None = option(None, "optimizer steps; exactly one of steps / epochs")
    epochs: float | None = option(None, "passes over the manifest's sample count (needs manifest.json)")
    seed: int = option(0, "seed of the model's initialisation, the shard order and the shuffling")
    resume: str | None = option(None, "'latest' (the checkpoint dir's latest.json; a fresh start if none) or a "
                                      "step_*.pt checkpoint, local or s3://")
    run_dir: str = option("runs/default", "log.jsonl, config.yaml, zeroshot.json (local path)")
    log_every: int = option(10, "steps between log lines")
    eval_every: int = option(0, "also evaluate (zero-shot, retrieval) every N steps, into the logs; 0 = only at "
                                "the end")
    device: str = option("auto", "auto = cuda when available, else cpu")
    precision: str = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU; fp16 (GPU) uses a GradScaler")
    compile: bool = option(False, "torch.compile the step: normalisation, forward and loss, and so their backward "
                                  "(GPU mostly; on CPU it needs a C++ compiler)")
    bf16_weights: bool = option(True, "with bf16 precision: the model computes in bf16 weights and activations, "
                                      "with fp32 master weights in the optimizer; false = fp32 weights under "
                                      "bf16 autocast")
    loss: str = option("clip", "clip (softmax contrastive) or siglip (pairwise sigmoid with a learnable bias; "
                               "logit scale starts at 10, bias at -10)")
    tensorboard: bool = option(True, "also log to {run_dir}/tensorboard")
    peak_tflops: float | None = option(None, "per-device peak for MFU; null = known GPUs' bf16 dense peak, none "
                                             "on CPU")
    threads: int = option(0, "torch intra-op threads per rank; 0 = CPU cores / local ranks")
    eval_batch_size: int = option(256, "images per forward pass in evaluation")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (local or s3://), then ``KEY=VALUE`` overrides; every bad value at once."""
    return load(TrainConfig, path, overrides)


def validate(config: TrainConfig) -> None:
    """Every bad value, each reported with ``problem`` (collected into one ConfigError while loading)."""

    def positive_int(key: str, value: int | None, allow_zero: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not allow_zero):
            problem(f"{key}={value}: must be a {'non-negative' if allow_zero else 'positive'} integer")

    def finite(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            problem(f"{key}={value}: must be within {bound}")

    c = config
    positive_int("batch_size", c.batch_size)
    positive_int("steps", c.steps)
    positive_int("log_every", c.log_every)
    positive_int("eval_every", c.eval_every, allow_zero=True)
    positive_int("eval_batch_size", c.eval_batch_size)
    positive_int("accum_steps", c.accum_steps)
    positive_int("data.eval_max_samples", c.data.eval_max_samples)
    positive_int("threads", c.threads, allow_zero=True)
    positive_int("data.workers", c.data.workers, allow_zero=True)
    positive_int("data.shuffle_buffer", c.data.shuffle_buffer)
    positive_int("data.max_image_pixels", c.data.max_image_pixels)
    positive_int("model.image_size", c.model.image_size)
    positive_int("optim.warmup_steps", c.optim.warmup_steps, allow_zero=True)
    positive_int("checkpoint.every_steps", c.checkpoint.every_steps, allow_zero=True)
    positive_int("optim.max_nonfinite_steps", c.optim.max_nonfinite_steps)
    positive_int("checkpoint.sigterm_within_steps", c.checkpoint.sigterm_within_steps, allow_zero=True)
    if c.steps is None and c.epochs is None:
        problem("steps and epochs are both null: set one, e.g. --set steps=1000")
    if c.steps is not None and c.epochs is not None:
        problem(f"steps={c.steps} and epochs={c.epochs}: set only one of them")
    if c.epochs is not None:
        finite("epochs", c.epochs, 0.0, 1e6, low_open=True)
    finite("optim.lr", c.optim.lr, 0.0, 10.0, low_open=True)
    finite("optim.min_lr_ratio", c.optim.min_lr_ratio, 0.0, 1.0)
    finite("optim.weight_decay", c.optim.weight_decay, 0.0, 10.0)
    finite("optim.beta1", c.optim.beta1, 0.0, 0.999999)
    finite("optim.beta2", c.optim.beta2, 0.0, 0.999999)
    finite("optim.eps", c.optim.eps, 0.0, 1.0, low_open=True)
    if c.optim.grad_clip is not None:
        finite("optim.grad_clip", c.optim.grad_clip, 0.0, 1e9, low_open=True)
    if c.precision not in PRECISIONS:
        problem(f"precision={c.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if c.device not in DEVICES:
        problem(f"device={c.device!r}: choose one of {', '.join(DEVICES)}")
    if c.device == "cpu" and c.precision in ("bf16", "fp16"):
        problem(f"precision={c.precision!r} with device='cpu': autocast is used on GPU only; use fp32")
    if c.batch_size > 0 and c.accum_steps > 0 and c.batch_size % c.accum_steps:
        problem(f"batch_size={c.batch_size}: must be a multiple of accum_steps={c.accum_steps}")
    for key, value in (("optim.image_lr", c.optim.image_lr), ("optim.text_lr", c.optim.text_lr)):
        if value is not None:
            finite(key, value, 0.0, 10.0, low_open=True)
    if c.loss not in LOSSES:
        problem(f"loss={c.loss!r}: choose one of {', '.join(LOSSES)}")
    if c.model.lock_image and c.model.lock_text:
        problem("model.lock_image and model.lock_text are both true: nothing but the logit scale would train")
    if c.model.pretrained is not None and not c.model.pretrained.strip():
        problem("model.pretrained='': give a weights file or an exported folder (or null)")
    if c.peak_tflops is not None:
        finite("peak_tflops", c.peak_tflops, 0.0, 1e6, low_open=True)
    if c.resume is not None and not c.resume.strip():
        problem("resume='': give 'latest' or the path of a step_*.pt checkpoint (or null)")
    if not c.data.train_shards:
        problem("data.train_shards is empty: give the folder of training shards")
    if "://" in c.run_dir and not c.run_dir.startswith("file://"):
        problem(f"run_dir={c.run_dir!r}: must be a local folder (checkpoint.dir may be s3://)")
    for key, value in (
        ("data.train_shards", c.data.train_shards),
        ("data.eval_tar", c.data.eval_tar),
        ("data.eval_shards", c.data.eval_shards),
        ("data.eval_classnames", c.data.eval_classnames),
        ("data.eval_templates", c.data.eval_templates),
        ("checkpoint.dir", c.checkpoint.dir),
        ("resume", c.resume),
        ("model.pretrained", c.model.pretrained),
    ):
        if value and value.startswith("pipe:"):
            problem(f"{key}={value!r}: pipe: URLs are not supported; give a local or s3:// path")
    if c.eval_every and not (c.data.eval_tar or c.data.eval_shards):
        problem(
            f"eval_every={c.eval_every} but data.eval_tar and data.eval_shards are null: "
            "give an eval set or set eval_every=0"
        )
    if c.data.eval_classnames and not c.data.eval_tar:
        problem(f"data.eval_classnames={c.data.eval_classnames!r} needs data.eval_tar (the labelled images)")
