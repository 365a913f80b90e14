"""Honest speed figures: samples/s, samples/s per device, model FLOP utilisation (MFU); ``Meter`` times a run.

MFU is the model's own FLOPs per sample times samples per second, over the devices'
peak. Model FLOPs are counted once at start with ``torch.utils.flop_counter`` on one
(image, caption) pair, forward only, times 3 (the backward costs about twice the
forward). Recomputation from gradient checkpointing is *not* counted: it is work the
model does not need, so it lowers MFU, as it should. The loss (a local x global
matrix) is left out: it is small next to the towers.

The peak is ``peak_tflops`` from the config, or for a known GPU its dense bf16 peak
from the table below; on a CPU, or an unknown GPU, MFU is null and only FLOP/s is
logged.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

# Dense (not 2:4 sparse) bf16 tensor-core peaks, TFLOP/s, by a substring of the device
# name; the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
)


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in name:
            return tflops * 1e12
    log.warning("no known bf16 peak for %r: MFU is not logged (set peak_tflops to get it)", name)
    return None


def train_flops_per_sample(model: torch.nn.Module, image_size: int, device: torch.device) -> float | None:
    """3 x the forward FLOPs of one (image, caption) pair; None if counting fails.

    Runs in eval mode without gradients and on zeros, so it changes no running statistic
    (BatchNorm) and draws no random number: the run that follows is unaffected. The
    fused inference path of ``nn.MultiheadAttention`` is switched off while counting: the
    counter does not see inside it, and training never takes it (ViT-B-32 would count
    11.85 GFLOP forward instead of 14.78).
    """
    context_length = int(getattr(model, "context_length", 77))
    images = torch.zeros((1, 3, image_size, image_size), device=device)
    texts = torch.zeros((1, context_length), dtype=torch.long, device=device)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(images, texts)
        return 3.0 * counter.get_total_flops()
    except Exception as exc:  # noqa: BLE001 - a speed figure must never stop a run
        log.warning("could not count model FLOPs (%s); MFU is not logged", exc)
        return None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def speed_record(
    samples: int, seconds: float, world_size: int, flops_per_sample: float | None, peak: float | None
) -> dict[str, float | None]:
    """The throughput fields of a log record, for ``samples`` trained in ``seconds`` of training time."""
    rate = samples / seconds if seconds > 0 else 0.0
    flops = rate * flops_per_sample if flops_per_sample else None
    return {
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_device": round(rate / world_size, 1),
        "tflops_per_s": None if flops is None else round(flops / 1e12, 4),
        "mfu": None if flops is None or not peak else round(flops / (peak * world_size), 4),
    }


class Meter:
    """Training time and speed of a run; time spent paused (evaluation, checkpoints) is not training time."""

    def __init__(self, samples: int, world_size: int, flops_per_sample: float | None, peak: float | None):
        self.world_size, self.flops_per_sample, self.peak = world_size, flops_per_sample, peak
        self.first_samples = self.last_samples = samples
        self.start = self.last_time = time.perf_counter()
        self.paused_s = self.last_paused_s = 0.0
        self.last_wait_s = 0.0

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began

    def speed(self, samples: int, seconds: float) -> dict[str, float | None]:
        """``speed_record`` of the samples trained since the start, in ``seconds`` of training time."""
        return speed_record(samples - self.first_samples, seconds, self.world_size, self.flops_per_sample, self.peak)

    def interval(self, samples: int, wait_s: float | None = None) -> dict[str, float | None]:
        """``speed_record`` since the previous call (or the start); ``samples`` is the run's count now.

        ``wait_s``, the run's total time waiting for data so far, adds ``data_wait_share``:
        the interval's wait over its training time (the loader keeps up when it is ~0).
        """
        now = time.perf_counter()
        seconds = now - self.last_time - (self.paused_s - self.last_paused_s)
        record = speed_record(samples - self.last_samples, seconds, self.world_size, self.flops_per_sample, self.peak)
        if wait_s is not None:
            waited = wait_s - self.last_wait_s
            record["data_wait_share"] = round(waited / seconds, 4) if seconds > 0 else None
            self.last_wait_s = wait_s
        self.last_time, self.last_samples, self.last_paused_s = now, samples, self.paused_s
        return record

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused_s
