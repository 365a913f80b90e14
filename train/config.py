"""The one typed configuration of a training run, from a YAML file plus overrides.

Why a dataclass and not an ``argparse.Namespace``: every setting has one declared type
and default, the whole run is described by one printable object (written next to the
checkpoints), and the loop never stores runtime state on it. Validation happens here,
before any model or data is touched, and names the bad value and what would be valid,
so a typo costs a second, not a crashed job.

Overrides use dotted keys: ``--set optim.lr=1e-3 --set batch_size=128``. Values are
parsed as YAML scalars (``null``, ``true``, ``1e-3``) and then checked against the
field's type.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A setting the user must change; the message says which and how."""


@dataclass
class DataConfig:
    train_shards: str = ""  # folder of {n:05d}.tar (+ manifest.json), local or s3://; required
    resampled: bool = False  # draw shards with replacement (seeded), for datasets too large for epochs
    eval_tar: str | None = None  # labelled zero-shot images: a tar or a folder of tars; null = no zero-shot
    eval_classnames: str | None = None  # text file, one class name per line; null = classnames.txt beside eval_tar
    eval_templates: str | None = None  # one prompt per line, {c} for the class name; null = the file beside eval_tar
    eval_shards: str | None = None  # folder of held-out tars for image-text retrieval; null = none
    eval_max_samples: int = 5000  # retrieval uses at most this many held-out samples (split over ranks)
    workers: int = 1  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 2000  # samples held for shuffling, per reader (drained at each epoch's end)
    max_image_pixels: int = 1 << 26  # images announcing more pixels are skipped (decompression bombs)


@dataclass
class ModelConfig:
    name: str = "webclip-tiny"  # open_clip model name (train/model_configs/*.json are registered)
    config_file: str | None = None  # extra open_clip model JSON; registered under its file stem
    image_size: int | None = None  # override the model config's image size; null = the config's
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CPU (oneDNN) and GPU
    grad_checkpointing: bool = False  # recompute transformer blocks in backward: less memory, ~30% more compute


@dataclass
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # on weight matrices only; gains, biases, logit scale are not decayed
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = None  # max global gradient norm; null = no clipping


@dataclass
class CheckpointConfig:
    dir: str | None = None  # local or s3://; null = {run_dir}/checkpoints
    every_steps: int = 0  # also save every N steps; 0 = only at the end


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    batch_size: int = 256  # global samples per optimizer step, split evenly over ranks and accum_steps
    accum_steps: int = 1  # micro-batches per optimizer step; each micro-batch is its own contrastive batch
    steps: int | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: float | None = None  # passes over the manifest's sample count (needs manifest.json)
    seed: int = 0
    resume: str | None = None  # "latest" (the checkpoint dir's latest.json; fresh start if none) or a .pt path
    run_dir: str = "runs/default"  # log.jsonl, config.yaml, zeroshot.json (local path)
    log_every: int = 10  # steps between log lines
    eval_every: int = 0  # also evaluate (zero-shot, retrieval) every N steps, into the logs; 0 = only at the end
    device: str = "auto"  # auto = cuda when available
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; fp16 (GPU) uses a GradScaler
    compile: bool = False  # torch.compile the model (GPU mostly; on CPU it needs a C++ compiler)
    tensorboard: bool = True  # also log to {run_dir}/tensorboard
    peak_tflops: float | None = None  # per-device peak for MFU; null = known GPUs' bf16 dense peak, none on CPU
    threads: int = 0  # torch intra-op threads per rank; 0 = CPU cores / local ranks
    eval_batch_size: int = 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


# -- loading ---------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key``."""
    optional, base = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}=null: a value is required")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: must be an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        raise ConfigError(f"{key}={value!r}: must be a number")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: must be a string")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not user input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {prefix}{unknown[0]!s}; valid keys here: {', '.join(prefix + k for k in sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; values are YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot parse the value ({exc})") from None
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``--set`` overrides; validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        with open(path, encoding="utf-8") as handle:
            try:
                tree = yaml.safe_load(handle) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(TrainConfig, tree)
    validate(config)
    return config


# -- validation ------------------------------------------------------------------


def validate(config: TrainConfig) -> None:
    """Raise one ConfigError listing every bad value (so one edit fixes them all)."""
    errors: list[str] = []

    def positive_int(key: str, value: int | None, allow_zero: bool = False) -> None:
        if value is None:
            return
        if value < 0 or (value == 0 and not allow_zero):
            errors.append(f"{key}={value}: must be a {'non-negative' if allow_zero else 'positive'} integer")

    def finite(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            errors.append(f"{key}={value}: must be within {bound}")

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
    if c.steps is None and c.epochs is None:
        errors.append("steps and epochs are both null: set one, e.g. --set steps=1000")
    if c.steps is not None and c.epochs is not None:
        errors.append(f"steps={c.steps} and epochs={c.epochs}: set only one of them")
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
        errors.append(f"precision={c.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if c.device not in DEVICES:
        errors.append(f"device={c.device!r}: choose one of {', '.join(DEVICES)}")
    if c.device == "cpu" and c.precision in ("bf16", "fp16"):
        errors.append(f"precision={c.precision!r} with device='cpu': autocast is used on GPU only; use fp32")
    if c.batch_size > 0 and c.accum_steps > 0 and c.batch_size % c.accum_steps:
        errors.append(f"batch_size={c.batch_size}: must be a multiple of accum_steps={c.accum_steps}")
    if c.peak_tflops is not None:
        finite("peak_tflops", c.peak_tflops, 0.0, 1e6, low_open=True)
    if c.resume is not None and not c.resume.strip():
        errors.append("resume='': give 'latest' or the path of a step_*.pt checkpoint (or null)")
    if not c.data.train_shards:
        errors.append("data.train_shards is empty: give the folder of training shards")
    if "://" in c.run_dir and not c.run_dir.startswith("file://"):
        errors.append(f"run_dir={c.run_dir!r}: must be a local folder (checkpoint.dir may be s3://)")
    for key, value in (
        ("data.train_shards", c.data.train_shards),
        ("data.eval_tar", c.data.eval_tar),
        ("data.eval_shards", c.data.eval_shards),
        ("data.eval_classnames", c.data.eval_classnames),
        ("data.eval_templates", c.data.eval_templates),
        ("checkpoint.dir", c.checkpoint.dir),
        ("resume", c.resume),
    ):
        if value and value.startswith("pipe:"):
            errors.append(f"{key}={value!r}: pipe: URLs are not supported; give a local or s3:// path")
    if c.eval_every and not (c.data.eval_tar or c.data.eval_shards):
        errors.append(
            f"eval_every={c.eval_every} but data.eval_tar and data.eval_shards are null: "
            "give an eval set or set eval_every=0"
        )
    if c.data.eval_classnames and not c.data.eval_tar:
        errors.append(f"data.eval_classnames={c.data.eval_classnames!r} needs data.eval_tar (the labelled images)")
    if errors:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(errors))


def describe_keys() -> str:
    """Every settable key with its default, for ``--help``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                lines.append(f"  {prefix}{f.name} = {value!r}")

    walk(TrainConfig, "")
    return "\n".join(lines)


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
