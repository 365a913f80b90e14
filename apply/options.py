"""What every ``apply`` command says the same way: which model, on which device; and how a command ends.

A command's config inherits ``ModelOptions``; ``run`` turns ``ConfigError`` / ``DataError``
into one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from core.config import ConfigError, DataError, at_least, one_of, option, require
from core.device import DEVICES, resolve_device


@dataclass
class ModelOptions:
    checkpoint: str = option(
        "", "the model: a webclip checkpoint (step_*.pt, or a run's checkpoint folder: its latest), a folder "
        "written by `python -m apply.export`, or an open_clip weights file with --model (local or s3://)"
    )  # fmt: skip
    model: str = option("", "open_clip model name, for an open_clip weights file (read from our checkpoints)")
    model_config: str = option("", "open_clip model JSON, for an architecture open_clip does not ship")
    device: str = option("auto", "auto (cuda when a GPU is visible), cpu or cuda")
    batch_size: int = option(64, "images per forward pass")

    def __post_init__(self) -> None:
        require(self, "checkpoint")
        one_of(self, "device", DEVICES)
        at_least(self, 1, "batch_size")

    def load(self):
        """The model these options name (``apply.model.load``)."""
        from apply import model as apply_model  # imported late: torch and open_clip take seconds to load

        return apply_model.load(self.checkpoint, model=self.model or None, model_config=self.model_config or None,
                                device=resolve_device(self.device))  # fmt: skip


def run(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit code; a ``ConfigError`` or ``DataError`` is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return body()
    except (ConfigError, DataError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
