"""The training loop, top to bottom: config in, checkpoints and zero-shot figures out.

    python -m train --config configs/demo/train.yaml [--set key=value ...]
    torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml

One process per rank. Each rank streams its own slice of the shards, encodes its
local batch, and computes the local contrastive loss against the features gathered
from every rank (``train/loss.py``); DDP averages the gradients. ``batch_size`` is the
global batch, so a run's hyper-parameters mean the same whatever the world size.

Rank 0 writes, under ``run_dir``: ``config.yaml`` (the resolved config), ``log.jsonl``
(one JSON object per ``log_every`` steps), ``zeroshot.json`` (all eval figures and
the run's totals); and checkpoints under ``checkpoint_dir``. The last line printed is
the zero-shot summary.
"""

from __future__ import annotations

import contextlib
import json
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
from train import distributed, zeroshot
from train import model as model_mod
from train.config import ConfigError, TrainConfig, to_yaml
from train.loss import MAX_LOGIT_SCALE, clip_loss

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


def check_inputs(config: TrainConfig) -> list[data_mod.Shard]:
    """Everything that can be checked before training starts: model name, data paths."""
    if config.model.config_file:
        if not os.path.isfile(config.model.config_file):
            raise ConfigError(f"model.config_file={config.model.config_file!r}: no such file")
        model_mod.register_model_config(config.model.config_file)
    if config.model.name not in model_mod.model_names():
        raise ConfigError(
            f"model.name={config.model.name!r}: unknown to open_clip; ours are in train/model_configs/, "
            "or give model.config_file"
        )
    try:
        shards = data_mod.list_shards(config.data.train_shards)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if config.data.eval_tar and not data_mod.storage.exists(config.data.eval_tar):
        raise ConfigError(f"data.eval_tar={config.data.eval_tar!r}: no such file (set data.eval_tar=null to skip eval)")
    return shards


# -- the run -----------------------------------------------------------------------------


def train(config: TrainConfig) -> zeroshot.ZeroShotResult | None:
    shards = check_inputs(config)
    world = distributed.init(config.device)
    try:
        result = _train(config, shards, world)
        distributed.barrier(world)  # leave together: gloo may abort a rank whose peer tears down first
        return result
    finally:
        distributed.cleanup()


def _train(config: TrainConfig, shards: list[data_mod.Shard], world: distributed.World):
    if config.batch_size % world.world_size:
        raise ConfigError(f"batch_size={config.batch_size}: must divide evenly over {world.world_size} ranks")
    local_batch = config.batch_size // world.world_size
    steps = total_steps(config, shards)
    on_gpu = world.device.type == "cuda"
    if config.precision == "bf16" and not on_gpu:
        raise ConfigError("precision='bf16': bf16 autocast is used on GPU only, and no GPU is in use; use fp32")
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and on_gpu)
    threads = config.threads or max(1, (os.cpu_count() or 1) // world.local_world_size)
    torch.set_num_threads(threads)

    if world.is_main:
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "config.yaml"), "w") as handle:
            handle.write(to_yaml(config))

    # Model: identical random init on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(config.seed)
    model = model_mod.create_model(config.model.name, image_size=config.model.image_size, device=world.device)
    tokenizer = model_mod.tokenizer_for(config.model.name)
    image_size = model_mod.image_size_of(model)
    mean, std = model_mod.normaliser(model, world.device)
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    bare_model = model
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[world.local_rank] if on_gpu else None)
    optimizer = torch.optim.AdamW(
        param_groups(bare_model, config.optim.weight_decay),
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
        fused=on_gpu,  # the fused kernel exists for CUDA tensors only
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # Data: this rank's slice of every epoch's shard order, batched in the stream.
    stream = data_mod.ShardStream(
        shards,
        batch_size=local_batch,
        image_size=image_size,
        tokenize=tokenizer,
        seed=config.seed,
        rank=world.rank,
        world_size=world.world_size,
        shuffle_buffer=config.data.shuffle_buffer,
        max_image_pixels=config.data.max_image_pixels,
    )
    batches = iter(data_mod.make_loader(stream, config.data.workers))

    if world.is_main:
        log.info(
            "model %s: %.2fM parameters, %d px; %d ranks x %d samples, %d steps, %d shards, %d threads, %d workers",
            config.model.name, model_mod.count_parameters(bare_model) / 1e6, image_size, world.world_size,
            local_batch, steps, len(shards), threads, config.data.workers,
        )  # fmt: skip
    eval_set = None
    if world.is_main and config.data.eval_tar:
        eval_set = zeroshot.load_eval_set(config.data.eval_tar, image_size)
    log_file = open(os.path.join(config.run_dir, "log.jsonl"), "w") if world.is_main else None
    bar = tqdm(total=steps, disable=not (world.is_main and sys.stderr.isatty()), dynamic_ncols=True)
    skipped: Counter = Counter()
    samples_seen, epoch = 0, 0
    start = last_time = time.perf_counter()
    last_samples, data_wait = 0, 0.0
    model.train()
    for step in range(steps):
        lr = cosine_lr(
            step,
            base_lr=config.optim.lr,
            warmup_steps=config.optim.warmup_steps,
            total_steps=steps,
            min_ratio=config.optim.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        skipped.update(batch.skipped)
        epoch = batch.epoch
        images = model_mod.normalise(batch.images.to(world.device, non_blocking=True), mean, std)
        images = images.contiguous(memory_format=memory_format)
        texts = batch.texts.to(world.device, non_blocking=True)

        with autocast:
            image_features, text_features, logit_scale = model(images, texts)[:3]
            loss = clip_loss(image_features, text_features, logit_scale, world.rank, world.world_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature: logit scale <= 100
            bare_model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        samples_seen += config.batch_size
        bar.update(1)

        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            now = time.perf_counter()
            loss_value = distributed.all_reduce_sum([loss.item()], world)[0] / world.world_size
            record = {
                "step": step + 1,
                "loss": round(loss_value, 5),
                "lr": lr,
                "samples_per_s": round((samples_seen - last_samples) / (now - last_time), 1),
                "logit_scale": round(bare_model.logit_scale.exp().item(), 3),
                "samples_seen": samples_seen,
                "epoch": epoch,
                "data_wait_s": round(data_wait, 2),
                "elapsed_s": round(now - start, 1),
                "skipped": dict(skipped),  # this rank's corrupt/incomplete samples so far, by reason
            }
            last_time, last_samples = now, samples_seen
            if world.is_main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{loss_value:.3f}", sps=record["samples_per_s"])
                if bar.disable:
                    log.info(json.dumps(record))
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < steps:
            if world.is_main:  # the other ranks wait at their next collective
                result = zeroshot.evaluate(bare_model, tokenizer, eval_set, world.device, config.eval_batch_size)
                record = {"step": step + 1, "zeroshot": {k: v for k, v in vars(result).items() if v is not None}}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log.info(result.line())
        if config.checkpoint.every_steps and (step + 1) % config.checkpoint.every_steps == 0 and step + 1 < steps:
            _save(config, world, bare_model, optimizer, step + 1, samples_seen, epoch)
    train_seconds = time.perf_counter() - start
    bar.close()

    checkpoint_path = _save(config, world, bare_model, optimizer, steps, samples_seen, epoch)
    skipped_total = dict(zip(SKIP_REASONS, distributed.all_reduce_sum([skipped[r] for r in SKIP_REASONS], world)))
    skipped_total = {k: int(v) for k, v in skipped_total.items() if v}
    summary = {
        "steps": steps,
        "samples_seen": samples_seen,
        "train_seconds": round(train_seconds, 1),
        "samples_per_s": round(samples_seen / train_seconds, 1),
        "data_wait_s": round(data_wait, 1),
        "skipped": skipped_total,
        "checkpoint": checkpoint_path,
        "model": config.model.name,
        "world_size": world.world_size,
    }
    if log_file is not None:
        log_file.close()
    if not world.is_main:
        return None
    log.info("trained %d steps in %.0f s (%.0f samples/s); skipped samples: %s",
             steps, train_seconds, summary["samples_per_s"], skipped_total or "none")  # fmt: skip

    result = None
    if eval_set is not None:
        result = zeroshot.evaluate(bare_model, tokenizer, eval_set, world.device, config.eval_batch_size)
        zeroshot.write_result(
            os.path.join(config.run_dir, "zeroshot.json"),
            result,
            {"eval": config.data.eval_tar, "eval_skipped": eval_set.skipped, "train": summary},
        )
        print(result.details())
        print(result.line(), flush=True)  # keep last: scripts read the last line
    else:
        data_mod.storage.write_json(os.path.join(config.run_dir, "zeroshot.json"), {"train": summary})
    return result


def _save(config, world, bare_model, optimizer, step, samples_seen, epoch) -> str | None:
    """Rank 0 writes (the weights are identical on every rank); the others wait for it."""
    path = None
    if world.is_main:
        progress = ckpt.TrainProgress(step=step, samples_seen=samples_seen, epoch=epoch)
        path = ckpt.save_checkpoint(
            config.checkpoint_dir,
            bare_model,
            optimizer,
            progress,
            config.model.name,
            config.to_dict(),
            model_mod.image_size_of(bare_model),
        )
        log.info("checkpoint: %s", path)
    distributed.barrier(world)
    return path
