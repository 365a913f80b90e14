"""``python -m ingest``: download a URL list into pool shards (img2dataset options)."""

from __future__ import annotations

import sys

from core.config import parse_config
from ingest.config import IngestConfig
from ingest.run import run_ingest

DESCRIPTION = """\
Download (url, caption) rows into WebDataset pool shards: {shard}.tar with the
images, {shard}.parquet with every input row (failures included, with a reason),
and {shard}_stats.json written last. Runs on Ray (a local instance unless
--ray_address or RAY_ADDRESS names a cluster). Rerun the same command to resume:
committed shards are skipped. Option names follow img2dataset.

Private, loopback, link-local and metadata addresses are refused unless listed in
--allow_networks (e.g. 127.0.0.1/32 for a local test server).

example:
  python -m ingest --url_list urls.parquet --input_format parquet \\
      --url_col url --caption_col caption --output_folder s3://bucket/pool
"""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(IngestConfig, argv, prog="python -m ingest", description=DESCRIPTION)
    summary = run_ingest(cfg)
    for line in summary.lines():
        print(line)
    print(f"pool written to {cfg.output_folder} in {summary.duration:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
