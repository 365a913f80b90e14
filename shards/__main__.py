"""``python -m shards``: kept pool samples → train shards, manifest.json and the report."""

from __future__ import annotations

import sys

from core import cli, storage
from core.config import parse_config
from shards.config import ReportConfig, ShardsConfig
from shards.manifest import MANIFEST
from shards.report import build_report, write_report
from shards.reshard import DamagedPool, reshard

DESCRIPTION = """\
Copy the samples the filter kept into train shards of --samples_per_shard samples,
mixed across pool shards (--mix_window pool shards interleaved, seeded: the same
inputs and settings give byte-identical shards), in the pool's layout ({shard}.tar,
{shard}.parquet, {shard}_stats.json). Writes manifest.json last: every shard's name,
sample count, bytes and sha256, the totals, the config, the code version and the
fingerprints of the pool, the decisions and the URL lists. Then (unless --report
false) the statistics report: report.json, index.html and datasheet.md.

Runs in local processes, or on Ray given a cluster (--ray_address, RAY_ADDRESS or
--distributor ray); resumable: a killed run, rerun with the same command, writes
only the train shards that are missing. Check the result with
`python -m shards.verify --folder OUTPUT_FOLDER`.
"""


def main(argv: list[str] | None = None) -> int:
    return cli.run("python -m shards", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg = parse_config(ShardsConfig, argv, prog="python -m shards", description=DESCRIPTION)
    retries = storage.retry_counts()
    cli.using(cfg, cli.shards_committed(cfg.output_folder, "train shards"))
    cli.hold_output(cfg.output_folder)
    try:
        manifest = reshard(cfg)
    except DamagedPool as exc:
        print(f"shards: the pool is damaged: {exc}", file=sys.stderr)
        return 1
    print(f"{manifest['total_samples']:,} samples in {manifest['shard_count']} train shards")
    if not manifest["total_samples"]:
        raise cli.EmptyResult(f"the decisions in {cfg.decisions} keep no sample of the pool: no train shard was written "
                              "(their _filter_stats.json counts the reasons; `python -m filter` says the likely fix)")
    print(f"manifest: {storage.join(cfg.output_folder, MANIFEST)}"
          f"{'' if cfg.report else storage.retries_note(storage.retries_since(retries))}")
    if cfg.report:
        report = build_report(ReportConfig(pool=cfg.pool, decisions=cfg.decisions, train=cfg.output_folder,
                                           output_folder=cfg.output_folder, **cfg.execution_options()))
        paths = write_report(cfg.output_folder, report)
        print(" → ".join(f"{s['label'].split(' (')[0]} {s['count']:,}" for s in report["funnel"]))
        print(f"report:   {paths['html']}{storage.retries_note(storage.retries_since(retries))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
