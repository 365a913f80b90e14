"""The training loop: config in, checkpoints and evaluation figures out.

    python -m train --config configs/demo/train.yaml [--set key=value ...] [--resume latest]
    torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml

One process per rank. Each rank streams its own slice of the shards, encodes its local
batch and computes the local contrastive loss against the features gathered from every
rank (``train/loss.py``); DDP averages the gradients. ``batch_size`` is the global batch
of one optimizer step, so hyper-parameters mean the same whatever the world size.

Gradient accumulation (``accum_steps``): a step is ``accum_steps`` micro-batches of
``batch_size / accum_steps`` samples, and **each micro-batch is its own contrastive
batch** (its negatives are the micro-batch's, not the step's; open_clip's ``accum_freq``
instead rebuilds the full-batch loss with a second forward pass). It saves memory at
the price of fewer negatives. DDP synchronises gradients once per step.

Speed (each an option; BENCHMARKS.md, "On a GPU"): the towers' attention and patch
embedding swapped for faster modules of the same parameters (``train/fast.py``); with
bf16 precision, a bf16 copy of the model computes the step while the optimizer updates
the fp32 model (the master weights, what checkpoints and evaluation use); with
``compile``, one ``torch.compile`` over normalisation, forward and loss.

Fine-tuning: ``model.pretrained`` weights to start from, ``model.lock_image`` /
``model.lock_text`` to freeze a tower, ``optim.image_lr`` / ``optim.text_lr`` for a
tower's own peak learning rate (each group follows the schedule in proportion).

Exact resume: a checkpoint holds the weights, the optimizer, the grad scaler and the
run's state (``train/state.py``); the LR is a function of the step and the data stream
of (seed, epoch, position), so ``--resume latest`` continues with the very batches the
stopped run would have seen.

Faults (issue 21): a step whose loss or gradient is not finite updates nothing and logs its
sample keys, and ``optim.max_nonfinite_steps`` such steps in a row stop the run; SIGTERM is
noted and the step finished, then the run trains on to a checkpoint due within
``checkpoint.sigterm_within_steps`` steps (else saves the current step) and exits as Ctrl-C.

Rank 0 writes under ``run_dir``: ``config.yaml``, ``log.jsonl`` and ``tensorboard/``,
``zeroshot.json`` (the final figures and the run's totals), ``zeroshot_scores.npz`` (the
final per-image class scores, ``train.zeroshot.write_scores``); checkpoints go to
``checkpoint_dir``. The last line printed is the zero-shot summary.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core import device as device_mod
from core.errors import DataError
from train import checkpoint as ckpt
from train import data as data_mod
from train import distributed, evaluate, fast, throughput, zeroshot
from train import model as model_mod
from train.config import ConfigError, OptimConfig, TrainConfig, to_yaml
from train.loss import MAX_LOGIT_SCALE, clip_loss, siglip_loss
from train.runlog import RunLog
from train.state import RunState

log = logging.getLogger("train")

SKIP_REASONS = sorted(v for k, v in vars(data_mod.Skip).items() if k.isupper())


# -- small pure pieces -----------------------------------------------------------------


def cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to ``base_lr``, then half a cosine down to ``base_lr * min_ratio``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on matrices only: gains, biases, embeddings of rank < 2 and the logit scale are exempt.

    ``lr_scales`` ({"image": s, "text": s}) puts a tower's parameters in groups of their
    own whose ``lr_scale`` multiplies the scheduled learning rate. Frozen parameters are left out.
    """
    lr_scales = lr_scales or {}
    groups: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "logit_scale" in name or "logit_bias" in name or name.endswith(".bias")
        scale = lr_scales.get(model_mod.tower_of(name) or "", 1.0)
        groups.setdefault((scale, exempt), []).append(param)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, key[0], key[1]))  # the plain two groups first
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay,
             **({"lr_scale": key[0]} if key[0] != 1.0 else {})} for key in order]  # fmt: skip


def lr_scales(optim: OptimConfig) -> dict[str, float]:
    return {tower: lr / optim.lr for tower, lr in (("image", optim.image_lr), ("text", optim.text_lr)) if lr}


def total_steps(config: TrainConfig, shards: list[data_mod.Shard]) -> int:
    if config.steps is not None:
        return config.steps
    samples = data_mod.total_samples(shards)
    if samples is None:
        raise ConfigError(
            f"epochs={config.epochs}: the sample count is unknown (no manifest.json in "
            f"{config.data.train_shards}); set steps instead"
        )
    return max(1, math.ceil(config.epochs * samples / config.batch_size))  # type: ignore[operator]


def check_inputs(config: TrainConfig) -> tuple[list[data_mod.Shard], str | None]:
    """Everything that can be checked before training starts: model name, data and eval paths, resume.

    Returns the training shards and the checkpoint to resume from (None: a fresh start).
    """
    if config.model.config_file:
        if not os.path.isfile(config.model.config_file):
            raise ConfigError(f"model.config_file={config.model.config_file!r}: no such file")
        model_mod.register_model_config(config.model.config_file)
    if config.model.name not in model_mod.model_names():
        raise ConfigError(
            f"model.name={config.model.name!r}: unknown to open_clip (e.g. ViT-B-32, RN50); ours are in "
            "train/model_configs/, or give model.config_file"
        )
    if config.model.pretrained and not config.resume:
        model_mod.pretrained_weights_file(config.model.pretrained)
    try:
        shards = data_mod.list_shards(config.data.train_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    for key in ("eval_tar", "eval_classnames", "eval_templates"):
        path = getattr(config.data, key)
        if path and not data_mod.storage.exists(path):
            raise DataError(f"data.{key}={path!r}: no such file (set data.{key}=null to go without)")
    if config.data.eval_tar:
        zeroshot.find_classes(config.data.eval_tar, config.data.eval_classnames, config.data.eval_templates)
    if config.data.eval_shards:
        try:
            data_mod.list_shards(config.data.eval_shards)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"data.eval_shards: {exc}") from None
    resume_from = None
    if config.resume:
        try:
            resume_from = ckpt.resolve_resume(config.resume, config.checkpoint_dir)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise DataError(str(exc)) from None
    return shards, resume_from


# -- one optimizer step ------------------------------------------------------------------------


@dataclass
class Stepper:
    """What an optimizer step works on (``build_stepper``)."""

    model: torch.nn.Module  # the bare model: what checkpoints and evaluation use; the optimizer's (master) weights
    forward: torch.nn.Module  # what the step computes with: ``worker`` or ``model``, behind DDP if distributed
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    compute: device_mod.Compute
    memory_format: torch.memory_format
    grad_clip: float | None
    rank: int = 0
    world_size: int = 1
    loss: str = "clip"
    worker: torch.nn.Module | None = None  # a copy in a lower precision that computes the step (bf16_weights)
    compile: bool | str = False  # True: torch.compile's default backend; a string: that backend (tests: aot_eager)
    finite: bool = True  # whether the last step's loss and gradients were finite (it updated nothing otherwise)

    def __post_init__(self) -> None:
        self.mean, self.std = model_mod.normaliser(self.model, self.compute.device)
        self.micro_loss = functools.partial(micro_loss, self)
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            self.micro_loss = torch.compile(self.micro_loss, backend=backend)
        if self.worker is not None:
            pairs = list(zip(self.model.parameters(), self.worker.parameters()))
            self.trained_pairs = [(m, w) for m, w in pairs if m.requires_grad]
            self.worker_dtype = next(self.worker.parameters()).dtype
            buffers = dict(self.worker.named_buffers())
            self.buffer_pairs = [(b, buffers[n]) for n, b in self.model.named_buffers() if n in self.model.state_dict()]

    def sync_worker(self) -> None:
        """The master weights (and the worker's buffers: BatchNorm statistics) copied across, after a step."""
        if self.worker is not None:
            with torch.no_grad():
                for master, work in self.buffer_pairs:
                    master.copy_(work)
                torch._foreach_copy_([w for _, w in self.trained_pairs], [m for m, _ in self.trained_pairs])


def build_stepper(model: torch.nn.Module, compute: device_mod.Compute, optim: OptimConfig, *, channels_last: bool,
                  compile: bool | str, world: distributed.World | None = None, loss: str = "clip",
                  worker_dtype: torch.dtype | None = None) -> Stepper:  # fmt: skip
    """Wrap ``model`` (already on its device) for training: memory format, worker copy, DDP, compile, AdamW, scaler.

    ``worker_dtype`` (bf16): the step computes with a copy of ``model`` in that dtype,
    without autocast, and the optimizer updates ``model`` (fp32 master weights) from its
    gradients; None: the step computes with ``model`` itself, under ``compute``'s autocast.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    worker = copy.deepcopy(model).to(worker_dtype) if worker_dtype is not None else None
    computing = worker if worker is not None else model
    ddp = None
    if world is not None and world.distributed:
        ddp = DistributedDataParallel(computing, device_ids=[world.local_rank] if compute.on_gpu else None)
    forward = ddp if ddp is not None else computing
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay, lr_scales(optim)),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=compute.on_gpu,  # the fused kernel exists for CUDA tensors only
    )
    scaler = torch.amp.GradScaler("cuda") if compute.amp_dtype == torch.float16 else None  # bf16 needs none
    rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
    return Stepper(model, forward, ddp, optimizer, scaler, compute, memory_format, optim.grad_clip, rank, world_size,
                   loss, worker, compile)  # fmt: skip


def micro_loss(s: Stepper, images_u8: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """One micro-batch's loss (fp32) from uint8 images and tokens on the device: what ``compile`` compiles."""
    images = model_mod.normalise(images_u8, s.mean, s.std).contiguous(memory_format=s.memory_format)
    if s.worker is not None:
        images = images.to(s.worker_dtype)
    with s.compute.autocast() if s.worker is None else contextlib.nullcontext():
        out = s.forward(images, texts)
    image_features, text_features, logit_scale = (t.float() for t in out[:3])
    if s.loss == "siglip":
        return siglip_loss(image_features, text_features, logit_scale, out[3].float(), s.rank, s.world_size)
    return clip_loss(image_features, text_features, logit_scale, s.rank, s.world_size)


def train_step(s: Stepper, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accum_steps: int,
               lr: float) -> torch.Tensor:  # fmt: skip
    """One optimizer step over ``accum_steps`` (uint8 images, tokens) micro-batches; returns their summed loss.

    Each micro-batch is its own contrastive batch; DDP synchronises gradients on the last
    one only. Gradients are clipped on their true (unscaled) values, and the logit scale
    is clamped at CLIP's cap of 100 after the step. With a worker copy, its gradients
    become the master weights' (fp32) and the updated master weights are copied back.
    """
    for group in s.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    s.optimizer.zero_grad(set_to_none=True)
    if s.worker is not None:
        s.worker.zero_grad(set_to_none=True)
    device = s.compute.device
    loss_sum = torch.zeros((), device=device)
    for micro, (images_u8, texts) in enumerate(micro_batches):
        images_u8 = images_u8.to(device, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        last = micro == accum_steps - 1
        with s.ddp.no_sync() if s.ddp is not None and not last else contextlib.nullcontext():
            loss = s.micro_loss(images_u8, texts)
            scaled = loss / accum_steps
            (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    if s.worker is not None:
        for master, work in s.trained_pairs:
            master.grad = None if work.grad is None else work.grad.to(master.dtype)
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
    s.finite = _finite(s, loss_sum)
    if not s.finite:  # a poisoned batch: no update (the caller logs its samples and counts it)
        s.optimizer.zero_grad(set_to_none=True)
        return loss_sum
    if s.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    with torch.no_grad():
        s.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
    s.sync_worker()
    return loss_sum


def _finite(s: Stepper, loss_sum: torch.Tensor) -> bool:
    """Whether the step's loss and (unscaled) gradients are all finite, the same answer on every rank.

    With fp16's grad scaler, an overflowing gradient is the scaler's to handle (it skips the
    step and lowers the scale): only the loss counts then. One device sync per step.
    """
    total = loss_sum.float()
    if s.scaler is None:
        grads = [p.grad for p in s.model.parameters() if p.grad is not None]
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads)).float().sum()
    bad = (~torch.isfinite(total)).float()
    if s.world_size > 1:  # a rank's own loss may be poisoned while the (averaged) gradients look alike
        torch.distributed.all_reduce(bad)
    return not bool(bad.item())


# -- the run -----------------------------------------------------------------------------


def train(config: TrainConfig):
    """Train as ``config`` says; returns the final zero-shot result on rank 0 (None elsewhere)."""
    shards, resume_from = check_inputs(config)
    world = distributed.init(config.device)
    try:
        result = _train(config, shards, resume_from, world)
        distributed.barrier(world)  # leave together: gloo may abort a rank whose peer tears down first
        return result
    finally:
        distributed.cleanup()


@dataclass
class Run:
    """What ``set_up`` builds once: the step's parts, the data, the evaluation, the state and the log."""

    config: TrainConfig
    world: distributed.World
    steps: int
    stepper: Stepper
    tokenizer: object
    data: data_mod.TrainStream
    state: RunState
    eval_plan: evaluate.EvalPlan | None
    run_log: RunLog
    meter: throughput.Meter
    resumed: bool
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (this process's run)


def _train(config: TrainConfig, shards: list[data_mod.Shard], resume_from: str | None, world: distributed.World):
    run = set_up(config, shards, resume_from, world)
    state, start_step = run.state, run.state.step
    bar = tqdm(total=run.steps, initial=state.step, disable=not (world.is_main and sys.stderr.isatty()),
               dynamic_ncols=True)  # fmt: skip
    run.run_log.echo = bar.disable
    _train_mode(run)
    nonfinite_run = 0  # non-finite steps in a row
    stop_at = None  # after SIGTERM: the step whose checkpoint ends the run
    with _sigterm_noted() as sigterm:
        while state.step < run.steps:
            o = config.optim
            lr = cosine_lr(state.step, base_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=run.steps,
                           min_ratio=o.min_lr_ratio)  # fmt: skip
            keys: list[str] = []  # the step's samples, logged if its loss or gradient is not finite
            micro_batches = ((batch.images, batch.texts) for batch in islice(run.data, config.accum_steps)
                             if not keys.extend(batch.keys))  # fmt: skip
            loss_sum = train_step(run.stepper, micro_batches, config.accum_steps, lr)
            nonfinite_run = _check_finite(run, loss_sum, keys, nonfinite_run)
            state.step += 1
            state.samples_seen += config.batch_size
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == run.steps:
                record = _step_record(run, loss_sum, lr)
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=record["samples_per_s"])
            if run.eval_plan is not None and _due(config.eval_every, state.step, run.steps):
                with run.meter.paused():
                    result = _evaluate(run)
                    _train_mode(run)
                if world.is_main and result.zeroshot is not None:
                    log.info(result.zeroshot.line())
            if stop_at is None and _signalled(sigterm, world):
                stop_at = _stop_step(run)
            stopping = stop_at is not None and stop_at <= state.step < run.steps  # at a step boundary: exact resume
            if stopping or _due(config.checkpoint.every_steps, state.step, run.steps):
                with run.meter.paused():
                    _save(run)
            if stopping:
                if world.is_main:
                    log.warning("SIGTERM: stopped at step %d with its checkpoint in %s; resume with --resume latest",
                                state.step, config.checkpoint_dir)  # fmt: skip
                bar.close()
                run.run_log.close()
                raise KeyboardInterrupt("SIGTERM")
    train_seconds = run.meter.train_seconds()
    bar.close()
    return finish(run, start_step, train_seconds)


@contextlib.contextmanager
def _sigterm_noted():
    """While training, SIGTERM is noted (the step finishes) instead of interrupting a step halfway."""
    noted = {"signum": 0}
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum, frame):  # noqa: ARG001 - a signal handler's signature
        noted["signum"] = signum

    previous = signal.signal(signal.SIGTERM, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signalled(noted: dict, world: distributed.World) -> bool:
    """Whether any rank got SIGTERM (all ranks agree, so that they save and stop at the same step)."""
    flag = float(bool(noted["signum"]))
    if world.distributed:
        flag = distributed.all_reduce_sum([flag], world)[0]
    return flag > 0


def _stop_step(run: Run) -> int:
    """After SIGTERM: the step to stop at, with a checkpoint: the next one due if it is within
    ``checkpoint.sigterm_within_steps`` steps (the end of the run included), else the current step."""
    step, every = run.state.step, run.config.checkpoint.every_steps
    due = min(run.steps, (step // every + (step % every > 0)) * every) if every else run.steps
    within = run.config.checkpoint.sigterm_within_steps
    stop = due if due - step <= within else step
    if run.world.is_main:
        log.warning("SIGTERM at step %d: %s", step, f"training on to the checkpoint due at step {due}"
                    if stop > step else "saving a checkpoint of this step now")  # fmt: skip
    return stop


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row with a non-finite loss or gradient: the run stops (exit 1)."""


def _check_finite(run: Run, loss_sum: torch.Tensor, keys: list[str], in_a_row: int) -> int:
    """After a step: log a skipped (non-finite) step's samples; stop after ``optim.max_nonfinite_steps`` in a row.

    A skipped step still counts as a step (the schedule and the data stream move on), so a
    resume stays exact; the weights are those before the batch.
    """
    if run.stepper.finite:
        return 0
    in_a_row += 1
    run.nonfinite_steps += 1
    limit = run.config.optim.max_nonfinite_steps
    log.warning("step %d: non-finite loss or gradient (loss %s): step skipped, weights unchanged (%d in a row, "
                "stop at %d); samples on rank %d: %s", run.state.step + 1, loss_sum.item(), in_a_row, limit,
                run.world.rank, " ".join(keys))  # fmt: skip
    run.run_log.write({"step": run.state.step + 1, "nonfinite": True, "rank": run.world.rank, "keys": keys})
    if in_a_row >= limit:
        raise NonFiniteLoss(
            f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient (up to step "
            f"{run.state.step + 1}; their samples are in the log): the model or data is broken; the last checkpoint "
            f"in {run.config.checkpoint_dir} holds finite weights (optim.max_nonfinite_steps={limit})"
        )
    return in_a_row


def _train_mode(run: Run) -> None:
    m = run.config.model
    for model in (run.stepper.model, run.stepper.worker):
        if model is not None:
            model_mod.train_mode(model, m.lock_image, m.lock_text)


def _due(every: int, step: int, steps: int) -> bool:
    """A periodic action at this step (the end has its own)."""
    return bool(every) and step % every == 0 and step < steps


def set_up(config: TrainConfig, shards: list[data_mod.Shard], resume_from: str | None,
           world: distributed.World) -> Run:  # fmt: skip
    """Model, optimizer, data, evaluation and state: a fresh start, or exactly where a checkpoint left off."""
    per_step = world.world_size * config.accum_steps
    if config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size}: must divide evenly over {world.world_size} rank(s) x "
            f"accum_steps={config.accum_steps}"
        )
    steps = total_steps(config, shards)
    compute = device_mod.prepare(world.device, config.precision, config.threads, share=world.local_world_size)
    saved_model, saved_state = ckpt.load_checkpoint(resume_from) if resume_from else (None, None)
    if world.is_main:
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "config.yaml"), "w") as handle:
            handle.write(to_yaml(config))

    torch.manual_seed(config.seed)  # identical random init on every rank (DDP also broadcasts rank 0's)
    m = config.model
    model = model_mod.create_model(m.name, image_size=m.image_size, device=world.device, siglip=config.loss == "siglip")
    if saved_model is not None:
        model.load_state_dict(saved_model["state_dict"])
    elif m.pretrained:
        model_mod.load_pretrained(model, m.pretrained)
    tokenizer = model_mod.tokenizer_for(m.name)
    image_size = model_mod.image_size_of(model)
    flops_per_sample = throughput.train_flops_per_sample(model, image_size, world.device)  # open_clip's own modules
    swapped = fast.speed_up(model, attention=m.fast_attention, patch_embed=m.fast_patch_embed)
    model_mod.lock_towers(model, m.lock_image, m.lock_text)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)  # open_clip's ResNet image tower ignores it (text tower only)
    bf16_worker = config.bf16_weights and compute.amp_dtype == torch.bfloat16
    stepper = build_stepper(model, compute, config.optim, channels_last=m.channels_last, compile=config.compile,
                            world=world, loss=config.loss, worker_dtype=torch.bfloat16 if bf16_worker else None)  # fmt: skip

    state = RunState()
    if saved_state is not None:
        stepper.optimizer.load_state_dict(saved_state["optimizer"])
        if stepper.scaler is not None and saved_state.get("scaler"):
            stepper.scaler.load_state_dict(saved_state["scaler"])
        state = RunState.restore(saved_state, world, config.data.workers)
        if world.is_main:
            log.info("resuming from %s at step %d (%d samples seen)", resume_from, state.step, state.samples_seen)
    elif config.resume and world.is_main:  # "latest" with no checkpoint yet: the first start of a restartable job
        log.info("resume=%s: no checkpoint in %s yet, starting at step 0", config.resume, config.checkpoint_dir)

    micro_batch = config.batch_size // per_step  # samples per rank per micro-step
    d = config.data
    data = data_mod.TrainStream(
        shards, state.data, d.workers, batch_size=micro_batch, image_size=image_size, tokenize=tokenizer,
        seed=config.seed, rank=world.rank, world_size=world.world_size, shuffle_buffer=d.shuffle_buffer,
        resampled=d.resampled, max_image_pixels=d.max_image_pixels,
    )  # fmt: skip
    eval_plan = evaluate.plan(config, image_size)
    if world.is_main:
        log.info(
            "model %s: %.2fM parameters, %d px, %s GFLOP/sample (fwd+bwd); %d ranks x %d accum x %d samples, "
            "%d steps, %d shards, %d threads, %d workers; %s loss, %s, fast modules %s%s",
            config.model.name, model_mod.count_parameters(model) / 1e6, image_size,
            "?" if flops_per_sample is None else f"{flops_per_sample / 1e9:.3g}", world.world_size,
            config.accum_steps, micro_batch, steps, len(shards), compute.threads, d.workers, config.loss,
            "bf16 weights, fp32 master" if bf16_worker else compute.precision, swapped,
            f"; from {m.pretrained}" if m.pretrained and saved_model is None else "",
        )  # fmt: skip
    run_log = RunLog(config.run_dir, world.is_main, config.tensorboard, append=saved_state is not None, echo=True)
    meter = throughput.Meter(state.samples_seen, world.world_size, flops_per_sample,
                             throughput.peak_flops(world.device, config.peak_tflops))  # fmt: skip
    state.restore_rng()  # last: nothing above may draw after this
    return Run(config, world, steps, stepper, tokenizer, data, state, eval_plan, run_log, meter,
               resumed=saved_state is not None)  # fmt: skip


def _step_record(run: Run, loss_sum: torch.Tensor, lr: float) -> dict:
    """Log this step (all ranks take part: the loss and skip counts are summed over ranks)."""
    state, cursor = run.state, run.state.data
    totals = distributed.all_reduce_sum([loss_sum.item()] + [cursor.skipped[r] for r in SKIP_REASONS], run.world)
    speed = run.meter.interval(state.samples_seen, run.data.wait_s)  # after .item(): the GPU's work is done
    record = {
        "step": state.step,
        "loss": round(totals[0] / run.world.world_size / run.config.accum_steps, 5),
        "lr": lr,
        **speed,
        "logit_scale": round(run.stepper.model.logit_scale.exp().item(), 3),
        "samples_seen": state.samples_seen,
        "epoch": cursor.epoch,
        "data_wait_s": round(run.data.wait_s, 2),
        "elapsed_s": round(run.meter.elapsed(), 1),
        "skipped": {r: int(n) for r, n in zip(SKIP_REASONS, totals[1:]) if n},  # all ranks, so far
    }
    run.run_log.write(record)
    return record


def _evaluate(run: Run) -> evaluate.Evaluation:
    result = evaluate.run(run.stepper.model, run.tokenizer, run.eval_plan, run.world, run.stepper.compute.autocast())
    run.run_log.write(result.record(run.state.step))
    return result


def _save(run: Run) -> str | None:
    s = run.stepper
    return run.state.save(run.config, run.world, s.model, s.optimizer, s.scaler, run.steps)


def finish(run: Run, start_step: int, train_seconds: float):
    """The last checkpoint, the run's totals, the final evaluation; rank 0 writes and prints them."""
    config, world, state = run.config, run.world, run.state
    checkpoint_path = ckpt.storage.join(config.checkpoint_dir, f"step_{state.step:08d}.pt")
    if state.step > start_step:  # a resume of a finished run trains nothing and saves nothing new
        checkpoint_path = _save(run)
    skipped = distributed.all_reduce_sum([state.data.skipped[r] for r in SKIP_REASONS], world)
    skipped_total = {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n}
    summary = {
        "steps": run.steps,
        "samples_seen": state.samples_seen,
        "resumed_from_step": start_step if run.resumed else None,
        "train_seconds": round(train_seconds, 1),
        **run.meter.speed(state.samples_seen, train_seconds),
        "flops_per_sample": run.meter.flops_per_sample,
        "data_wait_s": round(run.data.wait_s, 1),
        "data_wait_share": round(run.data.wait_s / train_seconds, 4) if train_seconds > 0 else None,
        "skipped": skipped_total,
        "nonfinite_steps_skipped": run.nonfinite_steps,
        **data_mod.storage.retry_counts(),  # object-storage requests retried (rank 0's process)
        "checkpoint": checkpoint_path,
        "model": config.model.name,
        "world_size": world.world_size,
    }
    evaluation = _evaluate(run) if run.eval_plan is not None else evaluate.Evaluation(None, None, None)
    run.run_log.close()
    if not world.is_main:
        return None
    log.info("trained %d steps in %.0f s (%.0f samples/s); skipped samples: %s",
             state.step - start_step, train_seconds, summary["samples_per_s"], skipped_total or "none")  # fmt: skip
    _write_results(run, summary, evaluation)
    for line in evaluation.lines():
        print(line, flush=True)  # the zero-shot summary last: scripts read the last line
    return evaluation.zeroshot


def _write_results(run: Run, summary: dict, evaluation: evaluate.Evaluation) -> None:
    """``zeroshot.json`` (figures and totals) and ``zeroshot_scores.npz`` (per-image scores)."""
    config, plan = run.config, run.eval_plan
    extra: dict = {"train": summary}
    if plan is not None:
        extra["eval"] = config.data.eval_tar
        extra["eval_skipped"] = plan.zeroshot_set.skipped if plan.zeroshot_set is not None else {}
    if evaluation.retrieval is not None:
        extra["retrieval"] = evaluation.retrieval
    results_path = os.path.join(config.run_dir, "zeroshot.json")
    if evaluation.zeroshot is None:
        data_mod.storage.write_json(results_path, extra)
        return
    zeroshot.write_result(results_path, evaluation.zeroshot, extra)
    scores_path = os.path.join(config.run_dir, "zeroshot_scores.npz")
    if not zeroshot.write_scores(scores_path, evaluation.scores, plan.zeroshot_set, plan.classes):
        log.info("zero-shot scores not written: %d images x %d classes is more than %d", *evaluation.scores.shape,
                 zeroshot.MAX_SCORES)  # fmt: skip
