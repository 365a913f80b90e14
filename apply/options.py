"""What every ``apply`` command says the same way: which model, on which device, in how many workers.

A command's config inherits ``ModelOptions`` (``WorkerModelOptions`` where a stage's workers
each load the model); how a command ends is ``core.cli.run``'s, as for every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import at_least, one_of, option, problem, require
from core.device import DEVICES, PRECISIONS, resolve_device


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
        getattr(super(), "__post_init__", lambda: None)()  # a config may also inherit core.executor.Execution
        require(self, "checkpoint")
        one_of(self, "device", DEVICES)
        at_least(self, 1, "batch_size")

    def load(self):
        """The model these options name (``apply.model.load``)."""
        from apply import model as apply_model  # imported late: torch and open_clip take seconds to load

        return apply_model.load(self.checkpoint, model=self.model or None, model_config=self.model_config or None,
                                device=resolve_device(self.device))  # fmt: skip


@dataclass
class WorkerModelOptions(ModelOptions):
    """A model in every worker of a stage (``apply.embed``, ``filter.clipscore``): its precision and share."""

    batch_size: int = option(256, "samples per forward pass")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU only)")
    threads_per_worker: int = option(
        0, "torch and decode threads per worker; 0 = 1 on CPU (the embeddings' bytes depend on it, never on the "
        "worker count), the CPUs / workers on GPU")  # fmt: skip
    gpus_per_worker: float = option(1.0, "GPUs each GPU worker holds; 0.5 puts two workers on one GPU")
    max_image_pixels: int = option(1 << 26, "images announcing more pixels are left out (too_many_pixels)")

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self, "precision", PRECISIONS)
        if self.device == "cpu" and self.precision in ("bf16", "fp16"):
            problem(f"precision={self.precision}: autocast is for GPUs; on CPU use fp32 (or auto)")
        at_least(self, 0, "threads_per_worker")
        if not self.gpus_per_worker > 0:
            problem(f"gpus_per_worker={self.gpus_per_worker}: must be positive")
        at_least(self, 1, "max_image_pixels")
