"""The training loop, top to bottom: config in, checkpoints and evaluation figures out.

    python -m train --config configs/demo/train.yaml [--set key=value ...] [--resume latest]
    torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml

One process per rank. Each rank streams its own slice of the shards, encodes its
local batch, and computes the local contrastive loss against the features gathered
from every rank (``train/loss.py``); DDP averages the gradients. ``batch_size`` is the
global batch of one optimizer step, so a run's hyper-parameters mean the same whatever
the world size.

Gradient accumulation (``accum_steps``): an optimizer step is made of ``accum_steps``
micro-batches of ``batch_size / accum_steps`` samples (over all ranks), and **each
micro-batch is its own contrastive batch**: its negatives are the other samples of
that micro-batch, not of the whole step. (open_clip's ``accum_freq`` instead caches
features to rebuild the full-batch loss, at the cost of a second forward pass.) So
``accum_steps`` saves memory at the price of fewer negatives; it is not the same run
as a larger micro-batch. DDP synchronises gradients once per step: the first
``accum_steps - 1`` backward passes run under ``no_sync()``.

Exact resume: the checkpoint holds everything the next step depends on (weights,
optimizer, grad scaler, step and samples seen; per rank the data readers' positions,
skip counts and RNG states; the LR is a pure function of the step). The data stream is
a pure function of (seed, epoch, position) (``train/data.py``), so ``--resume latest``
continues with the very batches the stopped run would have seen.

Rank 0 writes, under ``run_dir``: ``config.yaml`` (the resolved config), ``log.jsonl``
and ``tensorboard/`` (one record per ``log_every`` steps and per evaluation),
``zeroshot.json`` (the final figures and the run's totals); and checkpoints under
``checkpoint_dir``. The last line printed is the zero-shot summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import Counter

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from train import checkpoint as ckpt
from train import data as data_mod
from train import distributed, evaluate, throughput, zeroshot
from train import model as model_mod
from train.config import ConfigError, TrainConfig, to_yaml
from train.loss import MAX_LOGIT_SCALE, clip_loss
from train.runlog import RunLog

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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: gains, biases, embeddings of rank < 2 and the logit scale are exempt."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "logit_scale" in name or name.endswith(".bias")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def autocast_dtype(precision: str, on_gpu: bool) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision in ("bf16", "fp16") and not on_gpu:
        raise ConfigError(f"precision={precision!r}: autocast is used on GPU only, and no GPU is in use; use fp32")
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and on_gpu):
        return torch.bfloat16
    return None


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
    try:
        shards = data_mod.list_shards(config.data.train_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    for key in ("eval_tar", "eval_classnames", "eval_templates"):
        path = getattr(config.data, key)
        if path and not data_mod.storage.exists(path):
            raise ConfigError(f"data.{key}={path!r}: no such file (set data.{key}=null to go without)")
    if config.data.eval_shards:
        try:
            data_mod.list_shards(config.data.eval_shards)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data.eval_shards: {exc}") from None
    resume_from = None
    if config.resume:
        try:
            resume_from = ckpt.resolve_resume(config.resume, config.checkpoint_dir)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    return shards, resume_from


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


def _train(config: TrainConfig, shards: list[data_mod.Shard], resume_from: str | None, world: distributed.World):
    # -- settings that depend on the world -------------------------------------------------
    per_step = world.world_size * config.accum_steps
    if config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size}: must divide evenly over {world.world_size} rank(s) x "
            f"accum_steps={config.accum_steps}"
        )
    micro_batch = config.batch_size // per_step  # samples per rank per micro-step
    steps = total_steps(config, shards)
    on_gpu = world.device.type == "cuda"
    amp_dtype = autocast_dtype(config.precision, on_gpu)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    threads = config.threads or max(1, (os.cpu_count() or 1) // world.local_world_size)
    torch.set_num_threads(threads)
    if on_gpu:  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    saved_model, saved_state = ckpt.load_checkpoint(resume_from) if resume_from else (None, None)
    if world.is_main:
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "config.yaml"), "w") as handle:
            handle.write(to_yaml(config))

    # -- model and optimizer: identical random init on every rank (DDP also broadcasts rank 0's) --
    torch.manual_seed(config.seed)
    model = model_mod.create_model(config.model.name, image_size=config.model.image_size, device=world.device)
    if saved_model is not None:
        model.load_state_dict(saved_model["state_dict"])
    tokenizer = model_mod.tokenizer_for(config.model.name)
    image_size = model_mod.image_size_of(model)
    mean, std = model_mod.normaliser(model, world.device)
    flops_per_sample = throughput.train_flops_per_sample(model, image_size, world.device)
    peak = throughput.peak_flops(world.device, config.peak_tflops)
    if config.model.grad_checkpointing:
        model.set_grad_checkpointing(True)  # open_clip's ResNet image tower ignores it (text tower only)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    bare_model = model  # what checkpoints and evaluation use: no DDP or compile wrapper
    ddp = DistributedDataParallel(model, device_ids=[world.local_rank] if on_gpu else None) if world.distributed else None
    forward = ddp if ddp is not None else model
    if config.compile:
        forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(
        param_groups(bare_model, config.optim.weight_decay),
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
        fused=on_gpu,  # the fused kernel exists for CUDA tensors only
    )
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None  # bf16 needs none

    # -- where we start: step 0, or exactly where the checkpoint left off ---------------------
    step, samples_seen, epoch, batches_taken = 0, 0, 0, 0
    positions: dict[int, tuple[int, int]] = {}  # logical data worker -> (epoch, samples drawn)
    skipped: Counter = Counter()  # this rank's skipped samples, by reason
    rank_state = None
    if saved_state is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        if scaler is not None and saved_state.get("scaler"):
            scaler.load_state_dict(saved_state["scaler"])
        progress = saved_state["progress"]
        step, samples_seen, epoch = progress["step"], progress["samples_seen"], progress["epoch"]
        rank_state = _rank_state_for(saved_state, world, config)
        if rank_state is not None:
            batches_taken = rank_state["batches_taken"]
            positions = {int(w): (int(e), int(n)) for w, (e, n) in rank_state["positions"].items()}
            skipped.update(rank_state["skipped"])
        if world.is_main:
            log.info("resuming from %s at step %d (%d samples seen)", resume_from, step, samples_seen)
    elif config.resume and world.is_main:  # "latest" with no checkpoint yet: the first start of a restartable job
        log.info("resume=%s: no checkpoint in %s yet, starting at step 0", config.resume, config.checkpoint_dir)

    # -- data: this rank's slice of every epoch's shard order, batched in the stream ---------
    data_workers = max(1, config.data.workers)
    stream = data_mod.ShardStream(
        shards,
        batch_size=micro_batch,
        image_size=image_size,
        tokenize=tokenizer,
        seed=config.seed,
        rank=world.rank,
        world_size=world.world_size,
        shuffle_buffer=config.data.shuffle_buffer,
        resampled=config.data.resampled,
        start_epoch=epoch if rank_state is None else 0,
        start_positions=tuple(positions.get(w, (0, 0)) for w in range(data_workers)) if positions else (),
        worker_offset=batches_taken % data_workers,
        max_image_pixels=config.data.max_image_pixels,
    )
    batches = iter(data_mod.make_loader(stream, config.data.workers))
    eval_plan = evaluate.plan(config, image_size)

    if world.is_main:
        log.info(
            "model %s: %.2fM parameters, %d px, %s GFLOP/sample (fwd+bwd); %d ranks x %d accum x %d samples, "
            "%d steps, %d shards, %d threads, %d workers",
            config.model.name, model_mod.count_parameters(bare_model) / 1e6, image_size,
            "?" if flops_per_sample is None else f"{flops_per_sample / 1e9:.3g}", world.world_size,
            config.accum_steps, micro_batch, steps, len(shards), threads, config.data.workers,
        )  # fmt: skip
    bar = tqdm(total=steps, initial=step, disable=not (world.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    run_log = RunLog(config.run_dir, world.is_main, config.tensorboard, append=saved_state is not None,
                     echo=bar.disable)  # fmt: skip
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing above may draw after this

    # -- the loop ------------------------------------------------------------------------------
    start_step, start_samples = step, samples_seen
    start = last_time = time.perf_counter()
    paused = last_paused = data_wait = 0.0  # seconds in eval and checkpoints: not training time
    last_samples = samples_seen
    model.train()
    while step < steps:
        lr = cosine_lr(
            step,
            base_lr=config.optim.lr,
            warmup_steps=config.optim.warmup_steps,
            total_steps=steps,
            min_ratio=config.optim.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=world.device)
        for micro in range(config.accum_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            skipped.update(batch.skipped)
            positions[batch.worker] = batch.position
            batches_taken += 1
            epoch = batch.epoch
            images = model_mod.normalise(batch.images.to(world.device, non_blocking=True), mean, std)
            images = images.contiguous(memory_format=memory_format)
            texts = batch.texts.to(world.device, non_blocking=True)

            last_micro = micro == config.accum_steps - 1
            with ddp.no_sync() if ddp is not None and not last_micro else contextlib.nullcontext():
                with autocast:
                    image_features, text_features, logit_scale = forward(images, texts)[:3]
                    loss = clip_loss(image_features, text_features, logit_scale, world.rank, world.world_size)
                scaled = loss / config.accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach()

        if scaler is not None:
            scaler.unscale_(optimizer)  # clip (and step) on true gradients
        if config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), config.optim.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature: logit scale <= 100
            bare_model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        step += 1
        samples_seen += config.batch_size
        bar.update(1)

        if step % config.log_every == 0 or step == steps:
            totals = distributed.all_reduce_sum([loss_sum.item()] + [skipped[r] for r in SKIP_REASONS], world)
            now = time.perf_counter()  # after .item(): the GPU has finished the work being timed
            loss_value = totals[0] / world.world_size / config.accum_steps
            record = {
                "step": step,
                "loss": round(loss_value, 5),
                "lr": lr,
                **throughput.speed_record(
                    samples_seen - last_samples, now - last_time - (paused - last_paused), world.world_size,
                    flops_per_sample, peak,
                ),  # fmt: skip
                "logit_scale": round(bare_model.logit_scale.exp().item(), 3),
                "samples_seen": samples_seen,
                "epoch": epoch,
                "data_wait_s": round(data_wait, 2),
                "elapsed_s": round(now - start, 1),
                "skipped": {r: int(n) for r, n in zip(SKIP_REASONS, totals[1:]) if n},  # all ranks, so far
            }
            last_time, last_samples, last_paused = now, samples_seen, paused
            run_log.write(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", sps=record["samples_per_s"])

        if eval_plan is not None and config.eval_every and step % config.eval_every == 0 and step < steps:
            began = time.perf_counter()
            result, retrieval = evaluate.run(bare_model, tokenizer, eval_plan, world, autocast)
            run_log.write(_eval_record(step, result, retrieval))
            if world.is_main and result is not None:
                log.info(result.line())
            paused += time.perf_counter() - began
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < steps:
            began = time.perf_counter()
            _save(config, world, bare_model, optimizer, scaler, steps, step, samples_seen, epoch,
                  batches_taken, positions, skipped)  # fmt: skip
            paused += time.perf_counter() - began
    train_seconds = time.perf_counter() - start - paused
    bar.close()

    # -- the end: checkpoint, totals, final evaluation -----------------------------------------
    checkpoint_path = ckpt.storage.join(config.checkpoint_dir, f"step_{step:08d}.pt")
    if step > start_step:  # a resume of a finished run trains nothing and saves nothing new
        checkpoint_path = _save(config, world, bare_model, optimizer, scaler, steps, step, samples_seen, epoch,
                                batches_taken, positions, skipped)  # fmt: skip
    skipped_total = dict(zip(SKIP_REASONS, distributed.all_reduce_sum([skipped[r] for r in SKIP_REASONS], world)))
    skipped_total = {k: int(v) for k, v in skipped_total.items() if v}
    trained = samples_seen - start_samples
    summary = {
        "steps": steps,
        "samples_seen": samples_seen,
        "resumed_from_step": start_step if resume_from else None,
        "train_seconds": round(train_seconds, 1),
        **throughput.speed_record(trained, train_seconds, world.world_size, flops_per_sample, peak),
        "flops_per_sample": flops_per_sample,
        "data_wait_s": round(data_wait, 1),
        "skipped": skipped_total,
        "checkpoint": checkpoint_path,
        "model": config.model.name,
        "world_size": world.world_size,
    }
    result, retrieval = evaluate.run(bare_model, tokenizer, eval_plan, world, autocast) if eval_plan else (None, None)
    if eval_plan is not None:
        run_log.write(_eval_record(step, result, retrieval))
    run_log.close()
    if not world.is_main:
        return None
    log.info("trained %d steps in %.0f s (%.0f samples/s); skipped samples: %s",
             step - start_step, train_seconds, summary["samples_per_s"], skipped_total or "none")  # fmt: skip

    extra = {"train": summary}
    if eval_plan is not None:
        extra["eval"] = config.data.eval_tar
        extra["eval_skipped"] = eval_plan.zeroshot_set.skipped if eval_plan.zeroshot_set is not None else {}
    if retrieval is not None:
        extra["retrieval"] = retrieval
    results_path = os.path.join(config.run_dir, "zeroshot.json")
    if result is not None:
        zeroshot.write_result(results_path, result, extra)
    else:
        data_mod.storage.write_json(results_path, extra)
    if retrieval is not None:
        print(_retrieval_line(retrieval))
    if result is not None:
        print(result.details())
        print(result.line(), flush=True)  # keep last: scripts read the last line
    return result


def _eval_record(step: int, result, retrieval: dict | None) -> dict:
    record: dict = {"step": step}
    if result is not None:
        record["zeroshot"] = {k: v for k, v in vars(result).items() if v is not None}
    if retrieval is not None:
        record["retrieval"] = retrieval
    return record


def _retrieval_line(figures: dict) -> str:
    def f(key: str) -> str:
        return "n/a" if figures.get(key) is None else f"{figures[key]:.2f}"

    return (
        f"retrieval R@1/5/10: image->text {f('image_to_text_R@1')}/{f('image_to_text_R@5')}/"
        f"{f('image_to_text_R@10')}, text->image {f('text_to_image_R@1')}/{f('text_to_image_R@5')}/"
        f"{f('text_to_image_R@10')} (n={figures['n']})"
    )


def _rank_state_for(saved_state: dict, world: distributed.World, config: TrainConfig) -> dict | None:
    """This rank's saved data position and RNG, or None (with a warning) if the layout changed."""
    ranks = saved_state.get("ranks") or []
    saved_workers = saved_state.get("data_workers")
    if len(ranks) == world.world_size and saved_workers == config.data.workers:
        return ranks[world.rank]
    if world.is_main:
        log.warning(
            "checkpoint was written by %d rank(s) x %s data worker(s), this run has %d x %d: the data "
            "stream restarts at the checkpoint's epoch, so this resume is not exact",
            len(ranks), saved_workers, world.world_size, config.data.workers,
        )  # fmt: skip
    return None


def _save(config, world, bare_model, optimizer, scaler, steps, step, samples_seen, epoch,
          batches_taken, positions, skipped) -> str | None:  # fmt: skip
    """Every rank hands in its own state; rank 0 writes it all, the others wait for it."""
    mine = {
        "batches_taken": batches_taken,
        "positions": {w: list(p) for w, p in positions.items()},
        "skipped": dict(skipped),
        "rng": ckpt.rng_state(),
    }
    ranks = distributed.all_gather_objects(mine, world)
    path = None
    if world.is_main:
        state = {
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "schedule": {"total_steps": steps, "warmup_steps": config.optim.warmup_steps, "base_lr": config.optim.lr},
            "world_size": world.world_size,
            "data_workers": config.data.workers,
            "ranks": ranks,
            "config": config.to_dict(),
        }
        progress = ckpt.TrainProgress(step=step, samples_seen=samples_seen, epoch=epoch)
        path = ckpt.save_checkpoint(
            config.checkpoint_dir, bare_model, progress, config.model.name, model_mod.image_size_of(bare_model), state
        )
        log.info("checkpoint: %s", path)
    distributed.barrier(world)
    return path
