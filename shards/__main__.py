"""``python -m shards``: kept pool samples → train shards, manifest.json and a report."""

from __future__ import annotations

import sys

from core.config import parse_config
from core import storage
from shards.config import ShardsConfig
from shards.report import REPORT_HTML, build_report, write_report
from shards.reshard import MANIFEST, reshard

DESCRIPTION = """\
Copy the samples the filter kept into train shards of --samples_per_shard samples
(same layout as the pool: {shard}.tar, {shard}.parquet, {shard}_stats.json), write
manifest.json (every shard's name, sample count, bytes and sha256, plus the config
and code version) and a statistics summary: report.json and report.html.
"""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ShardsConfig, argv, prog="python -m shards", description=DESCRIPTION)
    manifest = reshard(cfg)
    report = build_report(cfg.pool, cfg.decisions, manifest)
    write_report(cfg.output_folder, report)
    funnel = report["funnel"]
    print(
        f"{manifest['total_samples']} samples in {len(manifest['shards'])} train shards "
        f"(input rows {funnel['input_rows']} → downloaded {funnel['downloaded']} → kept {funnel['kept']})"
    )
    print(f"manifest: {storage.join(cfg.output_folder, MANIFEST)}")
    print(f"report:   {storage.join(cfg.output_folder, REPORT_HTML)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
