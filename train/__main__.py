"""``python -m train --config FILE [--set key=value ...] [--resume latest]``: train a CLIP model on tar shards.

Settings come from the YAML file, then from the command line, in either style:
``--set optim.lr=1e-3`` or, like the other stages, ``--optim.lr 1e-3`` / ``--steps=10``.
"""

from __future__ import annotations

import logging
import os
import sys

# Set before torch loads OpenMP: a thread that finishes its share of an op sleeps instead of
# spinning, so it leaves the cores to our decode workers and other jobs (BENCHMARKS.md,
# "Training on the demo corpus"). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core import cli  # noqa: E402
from core.config import load_cli, to_yaml  # noqa: E402
from train.config import TrainConfig  # noqa: E402

DESCRIPTION = "Streaming CLIP training on WebDataset/img2dataset tar shards, then zero-shot eval."
EPILOG = """\
examples:
  python -m train --config configs/demo/train.yaml
  python -m train --config configs/demo/train.yaml --set steps=200 --set optim.lr=5e-4
  python -m train --config configs/demo/train.yaml --steps 200 --resume latest
  torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml
"""


def warmup_warning(config: TrainConfig) -> str | None:
    """A warm-up longer than the run: the learning rate never reached its peak."""
    if config.steps is not None and config.optim.warmup_steps > config.steps:
        return (f"optim.warmup_steps={config.optim.warmup_steps} is more than steps={config.steps}: the learning "
                "rate never reached optim.lr; lower optim.warmup_steps")
    return None


def main(argv: list[str] | None = None) -> int:
    """The command; every error ends in one explained line (``core.cli.run``: exit codes 1, 2, 130)."""
    return cli.run("python -m train", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(  # open_clip logs its model-building steps at INFO: keep those quiet
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S",
        force=True,  # core.cli.run set a plainer format first
    )
    logging.getLogger("train").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    config, args = load_cli(TrainConfig, argv, "python -m train", DESCRIPTION, EPILOG)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    resume = cli.resume_command() + ("" if config.resume else " --resume latest")
    cli.using(config, lambda: f"Checkpoints so far are in {config.checkpoint_dir}", resume=resume)
    if rank == 0:  # one lock per run: rank 0 writes the checkpoints
        cli.hold_output(config.checkpoint_dir)
    from train.loop import train  # imported late: torch and open_clip take seconds to load

    train(config)
    warning = warmup_warning(config)  # after the run, so that a bad value stays the one line of its error
    if warning:
        print(f"python -m train: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
