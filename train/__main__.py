"""``python -m train --config FILE [--set key=value ...] [--resume latest]``: train a CLIP model on tar shards.

Settings come from the YAML file, then from the command line, in either style:
``--set optim.lr=1e-3`` or, like the other stages, ``--optim.lr 1e-3`` / ``--steps=10``.
"""

from __future__ import annotations

import logging
import os
import sys

# Set before torch loads OpenMP: a thread that finishes its share of an op sleeps instead of
# spinning. On a small CPU shared with our own decode worker (and often with other jobs),
# spinning threads burn the cores the others need: measured 2-5x faster steps under
# contention on the 2-core demo machine. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from core.config import ConfigError, DataError, load_cli, to_yaml  # noqa: E402
from train.config import TrainConfig  # noqa: E402

DESCRIPTION = "Streaming CLIP training on WebDataset/img2dataset tar shards, then zero-shot eval."
EPILOG = """\
examples:
  python -m train --config configs/demo/train.yaml
  python -m train --config configs/demo/train.yaml --set steps=200 --set optim.lr=5e-4
  python -m train --config configs/demo/train.yaml --steps 200 --resume latest
  torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml
"""


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(  # open_clip logs its model-building steps at INFO: keep those quiet
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("train").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        config, args = load_cli(TrainConfig, argv, "python -m train", DESCRIPTION, EPILOG)
        if args.print_config:
            print(to_yaml(config), end="")
            return 0
        from train.loop import train  # imported late: torch and open_clip take seconds to load

        train(config)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
