"""``python -m filter``: decide keep / reject for every pool row, with a reason."""

from __future__ import annotations

import sys

from core.config import parse_config
from filter.config import FilterConfig
from filter.run import run_filter

DESCRIPTION = """\
Read the pool's parquet metadata (no images are decoded) and write one decision per
row — key, keep, reason — as {shard}.parquet in --output_folder, with counts per
reason in _filter_stats.json. Rules, in order: failed download (keeps its ingest
reason), repeated URL, caption missing or short, image too small, aspect ratio,
exact duplicate image (sha256). The first copy in key order is the one kept.
"""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FilterConfig, argv, prog="python -m filter", description=DESCRIPTION)
    summary = run_filter(cfg)
    print(f"{summary.rows} rows in {summary.shards} shards: kept {summary.kept}, rejected {summary.rows - summary.kept}")
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {reason:<20} {n}")
    print(f"decisions written to {cfg.output_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
