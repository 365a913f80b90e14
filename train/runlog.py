"""Where a run's figures go: ``{run_dir}/log.jsonl`` and TensorBoard, rank 0 only.

One JSON object per line, as the loop makes it; TensorBoard gets every number in it
(nested sections as ``section/key``) at the record's ``step``. A resumed run appends
to both, so the curves continue. Without a TTY each record is also logged as a line
(a progress bar takes its place on an interactive terminal).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("train")


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, append: bool, echo: bool):
        self.enabled = enabled
        self.echo = echo
        self._file = None
        self._writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, "log.jsonl"), "a" if append else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is a dependency; say so if it went missing
                log.warning("tensorboard is not installed: logging to log.jsonl only (pip install tensorboard)")
            else:
                self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None and "step" in record:
            for key, value in _scalars(record).items():
                self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()
        if self.echo:
            log.info(json.dumps(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
