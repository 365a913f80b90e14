"""``python -m shards.report``: what went in, what came out, what was dropped and why.

Built from metadata only — pool parquet, ``_stats.json`` markers, decisions, the
manifest; no image is decoded and no tar is read — for our pools and for folders made
by img2dataset (its error messages are mapped onto our reason codes). Writes three
files to the output folder:

* ``report.json``  — every number of the report, for tools;
* ``index.html``   — one self-contained page (plots are inline SVG, the table sorting
                     and filtering is inline script; nothing is fetched to view it);
* ``datasheet.md`` — a datasheet after "Datasheets for Datasets" (Gebru et al.),
                     filled with what the pipeline knows, the rest marked as unknown.

Pool shards are summarised in parallel (``shards/stats.py``), one shard at a time per
worker, by ``core.executor``: local processes, or Ray tasks on a cluster (a big pool's
metadata read by many machines); memory stays bounded whatever the dataset's size.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any

from core import storage
from core.config import parse_config
from core.executor import Executor
from core.layout import committed_shards
from core.reasons import Reason
from shards.config import ReportConfig
from shards.datasheet import render_datasheet
from shards.manifest import FILTER_STATS, INGEST_SUMMARY, MANIFEST, code_version
from shards.page import render_page
from shards.stats import (
    DISTRIBUTIONS,
    DOMAIN_COLUMNS,
    STEPS,
    UNCLASSIFIED,
    UNDECIDED,
    Summary,
    cluster_sizes,
    display_bins,
    quantiles,
    summarize_shard,
)

REPORT_JSON = "report.json"
REPORT_HTML = "index.html"
DATASHEET = "datasheet.md"

STEP_LABELS = {
    "input_rows": "input rows",
    "unique": "unique (URL and caption)",
    "attempted": "attempted (requested)",
    "downloaded": "downloaded",
    "kept": "kept by the filter",
    "in_train_shards": "in train shards",
}


def summarize(cfg: ReportConfig, shard_ids: list[int]) -> Summary:
    """Every pool shard's summary, merged in shard order (the capped tables depend on the order)."""
    total = Summary()
    with Executor(cfg, desc="report", unit="shard") as ex:
        for part in ex.map(partial(summarize_shard, cfg.pool, cfg.decisions), shard_ids, ordered=True):
            total.merge(part)  # merged as they come (summaries are small: counts and histograms)
    return total


def _reason_info(code: str) -> dict[str, str]:
    try:
        reason = Reason(code)
    except ValueError:
        if code == UNDECIDED:
            return {"stage": "filter", "description": "the decisions have no row for this pool row (not kept)"}
        if code == UNCLASSIFIED:
            return {"stage": "fetch", "description": "an img2dataset error message that none of our reason codes "
                                                     "matches (the messages are listed under unclassified_messages)"}
        return {"stage": "?", "description": "not a webclip reason code"}
    return {"stage": reason.stage.value, "description": reason.description}


def _funnel(summary: Summary, manifest: dict | None) -> list[dict[str, Any]]:
    steps = []
    previous = None
    for step in STEPS:
        count = summary.funnel[step]
        dropped = dict(summary.dropped[step].most_common()) if step != "input_rows" else {}
        label = STEP_LABELS[step] if step != "kept" or summary.has_decisions else "kept (no decisions given)"
        steps.append({"step": step, "label": label, "count": count,
                      "share_of_input": round(count / summary.funnel["input_rows"], 4) if summary.funnel["input_rows"]
                      else None,
                      "dropped": dropped, "dropped_total": (previous - count) if previous is not None else 0})
        previous = count
    if manifest is not None:
        count = manifest.get("total_samples", 0)
        steps.append({"step": "in_train_shards", "label": STEP_LABELS["in_train_shards"], "count": count,
                      "share_of_input": round(count / summary.funnel["input_rows"], 4)
                      if summary.funnel["input_rows"] else None,
                      "dropped": {}, "dropped_total": previous - count})
    return steps


def _domains(summary: Summary, top: int) -> dict[str, Any]:
    ranked = sorted(summary.domains.items(), key=lambda kv: (-kv[1][0], kv[0]))
    rows = []
    for domain, counts in ranked[:top]:
        row = {"domain": domain, **{c: int(v) for c, v in zip(DOMAIN_COLUMNS, counts)}}
        row["success_rate"] = round(row["downloaded"] / row["attempted"], 4) if row["attempted"] else None
        rows.append(row)
    return {"distinct": len(summary.domains), "exact": summary.domains_dropped_rows == 0,
            "rows_in_dropped_domains": summary.domains_dropped_rows, "top": rows}


def _distributions(summary: Summary) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, binning in DISTRIBUTIONS.items():
        series = summary.hists.get(name)
        if series is None:
            out[name] = {"label": binning.label, "unit": binning.unit, "recorded": False}
            continue
        out[name] = {
            "label": binning.label, "unit": binning.unit, "recorded": True, "scale": binning.scale,
            "quantiles": {s: quantiles(binning, v) for s, v in series.items()},
            "plot": display_bins(binning, series),
        }
    return out


def _read_optional(folder: str, name: str) -> dict | None:
    if not folder:
        return None
    path = storage.join(folder, name)
    return storage.read_json(path) if storage.exists(path) else None


def check_belong_together(cfg: ReportConfig, manifest: dict[str, Any]) -> None:
    """The train shards' manifest names the pool and decisions they were made from: the ones given must match."""
    from core.errors import DataError
    from core.layout import STATS_SUFFIX, folder_fingerprint

    inputs = manifest.get("inputs") or {}
    pool_ids = sorted(committed_shards(cfg.pool))
    made_from = (inputs.get("pool") or {}).get("fingerprint")
    if made_from and made_from != folder_fingerprint(cfg.pool, pool_ids, (".parquet", STATS_SUFFIX)):
        raise DataError(f"train={cfg.train!r} was made from another pool than pool={cfg.pool!r} (its manifest.json "
                        f"names {(inputs.get('pool') or {}).get('path')!r}); give that pool, or rerun shards")
    made_from = (inputs.get("decisions") or {}).get("fingerprint")
    if cfg.decisions and made_from:
        try:
            given = folder_fingerprint(cfg.decisions, pool_ids, (".parquet",))
        except FileNotFoundError:
            given = None
        if given != made_from:
            raise DataError(f"train={cfg.train!r} was made from other decisions than decisions={cfg.decisions!r} "
                            f"(its manifest.json names {(inputs.get('decisions') or {}).get('path')!r}); give those")


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    """Every number of the report (the content of report.json)."""
    start, retries = time.time(), storage.retry_counts()
    shard_ids = sorted(committed_shards(cfg.pool))
    if not shard_ids:
        raise SystemExit(f"report: no committed shards ({{shard}}_stats.json) in {cfg.pool!r}")
    if cfg.decisions and not storage.exists(cfg.decisions):
        raise SystemExit(f"report: decisions folder {cfg.decisions!r} does not exist")
    manifest = _read_optional(cfg.train, MANIFEST)
    if cfg.train and manifest is None:
        raise SystemExit(f"report: no {MANIFEST} in {cfg.train!r} (run `python -m shards` first)")
    if manifest is not None:
        check_belong_together(cfg, manifest)
    summary = summarize(cfg, shard_ids)
    ingest = _read_optional(cfg.pool, INGEST_SUMMARY)
    filter_stats = _read_optional(cfg.decisions, FILTER_STATS)
    reasons = {code for step in summary.dropped.values() for code in step}
    name = cfg.dataset_name or "/".join(cfg.pool.rstrip("/").split("/")[-2:])
    first, last = summary.time_span
    report = {
        "dataset": name,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "inputs": {"pool": cfg.pool, "layout": summary.layout, "pool_shards": len(shard_ids),
                   "decisions": cfg.decisions or None, "train": cfg.train or None},
        "collected": {"first_shard_started": _iso(first), "last_shard_ended": _iso(last)},
        "funnel": _funnel(summary, manifest),
        "failures": dict(summary.dropped["downloaded"].most_common()),
        "not_attempted": dict(summary.dropped["attempted"].most_common()),
        "not_unique": dict(summary.dropped["unique"].most_common()),
        "filter_rejections": dict(summary.dropped["kept"].most_common()) if summary.has_decisions else None,
        "reasons": {code: _reason_info(code) for code in sorted(reasons)},
        "unclassified_messages": dict(summary.unclassified_messages.most_common(20)),
        "domains": _domains(summary, cfg.top_domains),
        "distributions": _distributions(summary),
        "languages": {s: dict(c.most_common()) for s, c in summary.languages.items()} if summary.has_decisions
        else None,
        "near_duplicates": cluster_sizes(summary, "dup_near") if summary.has_decisions else None,
        "exact_duplicates": cluster_sizes(summary, "dup_exact") if summary.has_decisions else None,
        "opt_out": {"rows": sum(summary.opt_out_directives.values()),
                    "by_directive": dict(summary.opt_out_directives.most_common()),
                    "top_domains": [{"domain": d["domain"], "opt_out": d["opt_out"]}
                                    for d in sorted(_domains(summary, len(summary.domains))["top"],
                                                    key=lambda d: -d["opt_out"])[:10] if d["opt_out"]]},
        "pool_shards": sorted(summary.shards, key=lambda s: s["shard"]),
        "train_shards": None if manifest is None else {
            "count": manifest.get("shard_count", len(manifest.get("shards", []))),
            "samples": manifest.get("total_samples"), "bytes": manifest.get("total_bytes"),
            "shards": [{"name": e["name"], "samples": e["count"], "bytes": e["bytes"], "sha256": e.get("sha256")}
                       for e in manifest.get("shards", [])],
            "plan": manifest.get("plan"), "inputs": manifest.get("inputs"), "code_version": manifest.get("code_version"),
        },
        "configs": {"ingest": (ingest or {}).get("config"), "filter": (filter_stats or {}).get("config")},
        "input_lists": (ingest or {}).get("inputs"),
    }
    report["warnings"] = _warnings(summary, manifest, report)
    report["datasheet"] = render_datasheet(report)
    report["duration_s"] = round(time.time() - start, 2)
    report.update(storage.retries_since(retries))  # object-storage requests retried, workers' included
    return report


def _warnings(summary: Summary, manifest: dict | None, report: dict[str, Any]) -> list[str]:
    """Disagreements between the inputs that an auditor must see first."""
    warnings = []
    if summary.undecided:
        warnings.append(f"{summary.undecided:,} pool rows have no row in the decisions: counted as not kept "
                        f"(reason '{UNDECIDED}'); were the decisions made from this pool?")
    if manifest is not None:
        kept = summary.funnel["kept"]
        if manifest.get("total_samples") != kept:
            warnings.append(f"the train shards' manifest.json holds {manifest.get('total_samples')} samples but "
                            f"the pool and decisions keep {kept:,}: the train shards were not made from these inputs")
        made_from = ((manifest.get("inputs") or {}).get("pool") or {}).get("path")
        if made_from and made_from.rstrip("/") != report["inputs"]["pool"].rstrip("/"):
            warnings.append(f"the train shards were made from the pool at {made_from!r}, "
                            f"this report reads {report['inputs']['pool']!r}")
    return warnings


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


def write_report(output_folder: str, report: dict[str, Any]) -> dict[str, str]:
    """Write report.json, index.html and datasheet.md; return their paths."""
    storage.makedirs(output_folder)
    paths = {kind: storage.join(output_folder, name)
             for kind, name in (("json", REPORT_JSON), ("html", REPORT_HTML), ("datasheet", DATASHEET))}
    storage.write_json(paths["json"], report)
    with storage.atomic_write(paths["datasheet"], "w") as handle:
        handle.write(report["datasheet"])
    with storage.atomic_write(paths["html"], "w") as handle:
        handle.write(render_page(report))
    return paths


DESCRIPTION = __doc__.split("\n", 1)[1] + """
Examples:
  python -m shards.report --pool data/demo/pool --decisions data/demo/decisions \\
      --train data/demo/train --output_folder data/demo/report
  python -m shards.report --pool /data/img2dataset-out --output_folder /data/report
"""


def main(argv: list[str] | None = None) -> int:
    from core import cli

    return cli.run("python -m shards.report", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from core import cli

    cfg = parse_config(ReportConfig, argv, prog="python -m shards.report", description=DESCRIPTION)
    cli.using(cfg)
    report = build_report(cfg)
    paths = write_report(cfg.output_folder, report)
    funnel = " → ".join(f"{s['label'].split(' (')[0]} {s['count']:,}" for s in report["funnel"])
    print(funnel)
    print(f"report:    {paths['html']}  (and {REPORT_JSON}, {DATASHEET}){storage.retries_note(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
