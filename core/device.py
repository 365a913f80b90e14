"""Where a torch process computes and in what precision: one rule for the trainer, evaluation and the CLIP scorer.

``prepare(device, precision, threads)`` resolves ``device`` (auto = cuda when a GPU is
visible) and ``precision`` (auto = bf16 autocast on GPU, fp32 on CPU; bf16 and fp16 are
autocast dtypes and need a GPU), sets torch's intra-op threads and, on GPU, TF32 for the
fp32 matmuls left outside autocast. The returned ``Compute`` hands out the autocast
context. Bad values raise ``ConfigError`` naming the setting.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from core.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device, index: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a torch device; cuda gets device ``index`` (a rank's local rank)."""
    name = device.type if isinstance(device, torch.device) else device
    if name not in DEVICES:
        raise ConfigError(f"device={name!r}: choose one of {', '.join(DEVICES)}")
    use_cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no GPU visible to this process")
    if not use_cuda:
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.index is not None:
        return device
    return torch.device("cuda", index)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device``, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"precision={precision!r}: autocast is used on GPU only, and this process runs on "
                              f"{device.type}; use fp32 (or auto)")  # fmt: skip
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass(frozen=True)
class Compute:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32, no autocast
    threads: int

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def prepare(device: str | torch.device = "auto", precision: str = "auto", threads: int = 0,
            share: int = 1) -> Compute:  # fmt: skip
    """Resolve device and precision, then set this process's torch threads and TF32.

    ``threads=0``: the machine's CPU cores divided by ``share`` (the processes sharing
    them, e.g. the local ranks), at least one.
    """
    chosen = resolve_device(device)
    amp_dtype = autocast_dtype(precision, chosen)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, share))
    torch.set_num_threads(threads)
    if chosen.type == "cuda":  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Compute(chosen, amp_dtype, threads)
