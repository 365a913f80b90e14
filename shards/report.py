"""A first statistics summary of a dataset: ``report.json`` and a simple ``report.html``.

Built from metadata only (pool parquet, decisions, manifest; no image is decoded),
one pool shard at a time. It answers the auditor's first questions: how many rows
went in, how many were downloaded, kept and written, and why the others were not.
The page is self-contained (no scripts, no network).
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from core import storage
from core.layout import committed_shards, shard_name
from core.reasons import Reason

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_KNOWN = {r.value for r in Reason}


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p10": pick(0.1), "median": pick(0.5), "p90": pick(0.9), "max": ordered[-1]}


def build_report(pool: str, decisions: str, manifest: dict[str, Any]) -> dict[str, Any]:
    download_failures: Counter[str] = Counter()
    rejections: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    rows = downloaded = kept = 0
    widths: list[int] = []
    heights: list[int] = []
    caption_words: list[int] = []
    for shard_id in sorted(committed_shards(pool)):
        name = shard_name(shard_id)
        with storage.open_file(storage.join(decisions, f"{name}.parquet")) as handle:
            decided = pq.read_table(handle, columns=["key", "reason"]).to_pylist()
        rejected = {d["key"]: d["reason"] for d in decided if d["reason"]}
        with storage.open_file(storage.join(pool, f"{name}.parquet")) as handle:
            table = pq.read_table(handle, columns=["key", "url", "caption", "status", "reason",
                                                   "original_width", "original_height"])
        for row in table.to_pylist():
            rows += 1
            domains[(urlsplit(row["url"] or "").hostname or "(none)")] += 1
            if row["status"] != "success":
                download_failures[row["reason"] or "unknown"] += 1
                continue
            downloaded += 1
            if row["key"] in rejected:
                rejections[rejected[row["key"]]] += 1
                continue
            kept += 1
            widths.append(row["original_width"])
            heights.append(row["original_height"])
            caption_words.append(len((row["caption"] or "").split()))
    with_reasons = {r: Reason(r).description for r in {**download_failures, **rejections} if r in _KNOWN}
    return {
        "funnel": {
            "input_rows": rows,
            "downloaded": downloaded,
            "kept": kept,
            "in_train_shards": manifest["total_samples"],
        },
        "download_failures": dict(download_failures.most_common()),
        "filter_rejections": dict(rejections.most_common()),
        "reason_descriptions": dict(sorted(with_reasons.items())),
        "top_domains": dict(domains.most_common(20)),
        "kept_distributions": {
            "original_width": _quantiles(widths),
            "original_height": _quantiles(heights),
            "caption_words": _quantiles(caption_words),
        },
        "shards": manifest["shards"],
        "code_version": manifest["code_version"],
    }


def _bars(counts: dict[str, int], descriptions: dict[str, str]) -> str:
    if not counts:
        return "<p>none</p>"
    peak = max(counts.values())
    rows = []
    for name, n in counts.items():
        width = max(1, round(300 * n / peak))
        rows.append(
            f"<tr><td title='{html.escape(descriptions.get(name, ''))}'><code>{html.escape(name)}</code></td>"
            f"<td class=n>{n}</td><td><svg width=300 height=12><rect width={width} height=12 fill='#4477aa'/>"
            "</svg></td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def render_html(report: dict[str, Any]) -> str:
    funnel = report["funnel"]
    top = funnel["input_rows"] or 1
    funnel_rows = "".join(
        f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td class=n>{v}</td><td class=n>{v / top:.1%}</td></tr>"
        for k, v in funnel.items()
    )
    dist_rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td class=n>{(q or {}).get(c, '')}</td>"
        for c in ("min", "p10", "median", "p90", "max")) + "</tr>"
        for k, q in report["kept_distributions"].items()
    )
    shard_rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td class=n>{s['count']}</td><td class=n>{s['bytes']}</td>"
        f"<td><code>{s['sha256'][:16]}…</code></td></tr>"
        for s in report["shards"]
    )
    descriptions = report["reason_descriptions"]
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>webclip dataset report</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}}td{{padding:2px 8px}}
.n{{text-align:right;font-variant-numeric:tabular-nums}}h2{{margin-top:1.5em}}</style></head><body>
<h1>Dataset report</h1>
<p>Built from metadata only. Code version <code>{html.escape(report['code_version'])}</code>.</p>
<h2>Funnel</h2><table>{funnel_rows}</table>
<h2>Download failures, by reason</h2>{_bars(report['download_failures'], descriptions)}
<h2>Filter rejections, by reason</h2>{_bars(report['filter_rejections'], descriptions)}
<h2>Kept samples: distributions</h2>
<table><tr><th></th><th>min</th><th>p10</th><th>median</th><th>p90</th><th>max</th></tr>{dist_rows}</table>
<h2>Top domains (input rows)</h2>{_bars(report['top_domains'], {})}
<h2>Train shards</h2><table><tr><th>name</th><th>samples</th><th>bytes</th><th>sha256</th></tr>{shard_rows}</table>
</body></html>
"""


def write_report(output_folder: str, report: dict[str, Any]) -> None:
    storage.write_json(storage.join(output_folder, REPORT_JSON), report)
    with storage.atomic_write(storage.join(output_folder, REPORT_HTML), "w") as handle:
        handle.write(render_html(report))
