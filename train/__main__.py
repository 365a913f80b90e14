"""``python -m train --config FILE [--set key=value ...] [--resume latest]``: train a CLIP model on tar shards.

Settings come from the YAML file, then from the command line, in either style:
``--set optim.lr=1e-3`` or, like the other stages, ``--optim.lr 1e-3`` / ``--steps=10``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Set before torch loads OpenMP: a thread that finishes its share of an op sleeps instead of
# spinning, so it leaves the cores to our decode workers and other jobs (BENCHMARKS.md,
# "Training on the demo corpus"). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.config import ConfigError, describe_keys, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Streaming CLIP training on WebDataset/img2dataset tar shards, then zero-shot eval.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # every other --KEY is a setting: no prefix guessing
        epilog=(
            "examples:\n"
            "  python -m train --config configs/demo/train.yaml\n"
            "  python -m train --config configs/demo/train.yaml --set steps=200 --set optim.lr=5e-4\n"
            "  python -m train --config configs/demo/train.yaml --steps 200 --resume latest\n"
            "  torchrun --nproc_per_node 2 -m train --config configs/demo/train.yaml\n\n"
            "settings (--set KEY=VALUE or --KEY VALUE; values are YAML scalars, null clears an optional one):\n"
            + describe_keys()
            + "\n"
        ),
    )
    parser.add_argument("--config", help="YAML file of settings (defaults are listed below)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set batch_size=128 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", metavar="latest|PATH",
        help="continue a stopped run exactly: 'latest' (the newest checkpoint in checkpoint.dir; "
        "a fresh start if there is none) or a step_*.pt checkpoint, local or s3://",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        args.overrides += flat_overrides(rest)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.resume is not None:
        args.overrides.append(f"resume={args.resume}")
    return args


def flat_overrides(tokens: list[str]) -> list[str]:
    """``["--optim.lr", "1e-3", "--steps=10"]`` -> ``["optim.lr=1e-3", "steps=10"]``.

    Every setting is also a flag, as in the other stages; unknown keys are reported by
    the config loader, with the valid ones.
    """
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: settings are --KEY VALUE or --set KEY=VALUE")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{token}: needs a value, e.g. {token} 10")
            value = tokens[i + 1]
            i += 1
        out.append(f"{key.replace('-', '_')}={value}")
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(  # open_clip logs its model-building steps at INFO: keep those quiet
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("train").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            from train.config import to_yaml

            print(to_yaml(config), end="")
            return 0
        from train.loop import train  # imported late: torch and open_clip take seconds to load

        train(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
