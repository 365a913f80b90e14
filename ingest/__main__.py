"""``python -m ingest``: download a URL list into pool shards (img2dataset options)."""

from __future__ import annotations

import sys

from core import cli, storage
from core.config import parse_config
from ingest.config import IngestConfig
from ingest.run import judge, run_ingest

PROG = "python -m ingest"
DESCRIPTION = """\
Download (url, caption) rows into pool shards. Each input row ends as one row of
{shard}.parquet (status, reason code, sizes, hashes, content type, final URL);
each success also as {key}.jpg/.txt/.json in {shard}.tar (webdataset), in a folder
{shard}/ (files) or in the parquet's jpg column (parquet). {shard}_stats.json is
written last and commits the shard: rerun the same command after a crash and only
uncommitted shards are redone.

Option names and meanings follow img2dataset, so its command lines work unchanged
(list options take '["a","b"]' or a,b). Where shards run are the options every
stage shares (--distributor, --workers, --max_retries, --max_in_flight,
--ray_address, --progress); img2dataset's --processes_count, --max_shard_retry and
--max_shards_in_flight are the same as --workers, --max_retries and --max_in_flight,
and its --distributor multiprocessing is our processes. Defaults that differ:
output_format webdataset (img2dataset: files), distributor auto (local processes,
or Ray tasks when --ray_address or RAY_ADDRESS names a cluster), thread_count 64,
workers 0 (one per CPU).

Safe by default: http(s) only; private, loopback, link-local and metadata
addresses are refused, after DNS and on every redirect, unless listed in
--allow_networks (e.g. 127.0.0.1/32 for a local test server); bytes, pixels and
time per sample are capped; X-Robots-Tag opt-outs are honoured.

examples:
  python -m ingest --url_list urls.parquet --input_format parquet \\
      --url_col url --caption_col caption --output_folder s3://bucket/pool
  python -m ingest --config configs/demo/ingest.yaml --processes_count 8
  python -m ingest --config my.yaml --distributor ray --ray_address auto      (a running cluster)
"""


def main(argv: list[str] | None = None) -> int:
    return cli.run(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg = parse_config(IngestConfig, argv, prog=PROG, description=DESCRIPTION)
    cli.using(cfg, cli.shards_committed(cfg.output_folder, "pool shards"))
    cli.hold_output(cfg.output_folder)
    summary = run_ingest(cfg)
    for line in summary.lines():
        print(line)
    print(f"pool written to {cfg.output_folder} in {summary.duration:.1f}s{storage.retries_note(summary.__dict__)}")
    judge(cfg, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
