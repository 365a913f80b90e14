"""core/device.py: one rule for device, precision, threads and autocast."""

from __future__ import annotations

import contextlib

import pytest
import torch

from core.config import ConfigError
from core.device import autocast_dtype, prepare, resolve_device


def test_cpu_runs_fp32_without_autocast():
    before = torch.get_num_threads()
    try:
        compute = prepare("cpu", "auto", threads=1)
        assert compute.device == torch.device("cpu") and compute.amp_dtype is None and compute.precision == "fp32"
        assert torch.get_num_threads() == 1 and compute.threads == 1
        assert isinstance(compute.autocast(), contextlib.nullcontext)
    finally:
        torch.set_num_threads(before)


def test_bad_settings_name_themselves():
    with pytest.raises(ConfigError, match=r"precision='bf16': autocast is used on GPU only"):
        autocast_dtype("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"precision='fp8'"):
        autocast_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            resolve_device("cuda")


def test_gpu_precisions_map_to_autocast_dtypes():
    gpu = torch.device("cuda", 0)  # the rule only, no GPU needed
    assert autocast_dtype("auto", gpu) is torch.bfloat16 and autocast_dtype("fp16", gpu) is torch.float16
    assert autocast_dtype("fp32", gpu) is None
