"""The report as one self-contained HTML page: inline SVG plots, sortable tables.

Nothing is fetched when the page is viewed (no fonts, scripts or images from
elsewhere): plots are SVG written here, and the only script is the few lines below
that sort a table by a clicked column and filter its rows by a typed text.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

COLORS = {"downloaded": "#88a8d0", "kept": "#1f5fa8", "bar": "#1f5fa8", "drop": "#c8553d"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:72em;margin:0 auto;padding:1.5em 2em 4em}
h1{margin:.2em 0}h2{margin-top:2em;border-bottom:1px solid #dde2ea;padding-bottom:.2em}
h3{margin:1.2em 0 .3em;font-size:1em}
.meta{color:#5b6577}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.5em}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(25em,1fr));gap:1.2em}
figure{margin:0;background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:.6em}
figcaption{font-weight:600;margin-bottom:.3em}table{border-collapse:collapse;background:#fff}
td,th{padding:3px 9px;border-bottom:1px solid #edf0f4;text-align:left;vertical-align:top}
th{background:#f1f4f8;position:sticky;top:0}.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#9aa3b2}
table.sortable th.asc:after{content:" \\2191";color:#1d2330}table.sortable th.desc:after{content:" \\2193";color:#1d2330}
.filter{margin:.4em 0;padding:4px 8px;width:20em;border:1px solid #c9d0db;border-radius:4px}
.scroll{max-height:32em;overflow:auto;border:1px solid #dde2ea;border-radius:6px}
code{background:#eef1f5;padding:0 3px;border-radius:3px}.legend span{margin-right:1em}
.legend i{display:inline-block;width:.8em;height:.8em;margin-right:.3em;vertical-align:-1px}
.datasheet{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:.2em 1.5em}
.note{color:#5b6577;font-size:.92em}
.warning{background:#fff4e5;border:1px solid #e8a33d;border-radius:6px;padding:.5em 1em}
"""

# Sort a table by the clicked header (numbers as numbers), filter rows by text.
_SCRIPT = """
(function(){
  function cellValue(row, i){
    var c = row.cells[i]; var v = c.getAttribute('data-v'); if (v === null) v = c.textContent.trim();
    var x = parseFloat(v); return (v !== '' && !isNaN(x) && isFinite(v)) ? x : v.toLowerCase();
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function(th, i){
      th.addEventListener('click', function(){
        var asc = !th.classList.contains('asc');
        Array.prototype.forEach.call(heads, function(h){ h.classList.remove('asc', 'desc'); });
        th.classList.add(asc ? 'asc' : 'desc');
        var body = table.tBodies[0]; var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){
          var x = cellValue(a, i), y = cellValue(b, i);
          if (typeof x !== typeof y) { x = String(x); y = String(y); }
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
  document.querySelectorAll('input.filter').forEach(function(input){
    var table = document.getElementById(input.getAttribute('data-table'));
    input.addEventListener('input', function(){
      var q = input.value.toLowerCase(); var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function(r){
        var hit = r.textContent.toLowerCase().indexOf(q) >= 0; r.style.display = hit ? '' : 'none'; if (hit) shown++;
      });
      var out = document.getElementById(input.getAttribute('data-count'));
      if (out) out.textContent = shown + ' shown';
    });
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


# -- plots -----------------------------------------------------------------------------------


def bar_chart(items: list[tuple[str, int, str]], color: str = COLORS["bar"], width: int = 560) -> str:
    """Horizontal bars: (label, value, tooltip)."""
    if not items:
        return "<p class=note>none</p>"
    row, label_w, text_w = 20, 190, 70
    peak = max(v for _, v, _ in items) or 1
    bar_w = width - label_w - text_w
    parts = [f'<svg class=plot role=img width="{width}" height="{row * len(items) + 4}" '
             f'viewBox="0 0 {width} {row * len(items) + 4}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value, tip) in enumerate(items):
        y = i * row + 2
        w = max(1.0, bar_w * value / peak)
        parts.append(f'<g><title>{_e(tip or label)}: {value:,}</title>'
                     f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">{_e(label[:30])}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{color}"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="12">{value:,}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _tick(value: float, scale: str) -> str:
    if scale in ("int", "log10") and value >= 1000:
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= div:
                return f"{value / div:.3g}{unit}"
    if scale == "log2" or scale == "linear":
        return f"{value:.2f}"
    return f"{value:.3g}"


def histogram(plot: dict[str, Any], scale: str, unit: str, width: int = 420, height: int = 190) -> str:
    """Bars of each series side by side per bin; x labels at a few bin edges."""
    edges, series = plot["edges"], plot["series"]
    if not edges:
        return "<p class=note>no values</p>"
    left, bottom, top = 48, 34, 8
    inner_w, inner_h = width - left - 8, height - bottom - top
    bins = len(edges) - 1
    peak = max((max(v) for v in series.values() if v), default=1) or 1
    slot = inner_w / bins
    names = [s for s in series if any(series[s])]
    bar = slot / max(1, len(names))
    parts = [f'<svg class=plot role=img width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{top + inner_h}" x2="{left + inner_w}" y2="{top + inner_h}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + inner_h}" stroke="#888"/>',
             f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" font-size="10">{_tick(peak, "int")}</text>',
             f'<text x="{left - 4}" y="{top + inner_h}" text-anchor="end" font-size="10">0</text>']
    for s_i, name in enumerate(names):
        for b, value in enumerate(series[name]):
            if not value:
                continue
            h = inner_h * value / peak
            x = left + b * slot + s_i * bar
            parts.append(f'<rect x="{x:.1f}" y="{top + inner_h - h:.1f}" width="{max(0.6, bar - 0.4):.1f}" '
                         f'height="{h:.1f}" fill="{COLORS.get(name, COLORS["bar"])}"><title>{_e(name)} '
                         f'{_tick(edges[b], scale)}–{_tick(edges[b + 1], scale)} {_e(unit)}: {value:,}</title></rect>')
    for b in range(0, bins + 1, max(1, bins // 5)):
        x = left + b * slot
        parts.append(f'<text x="{x:.1f}" y="{top + inner_h + 14}" text-anchor="middle" font-size="10">'
                     f'{_tick(edges[b], scale)}</text>')
    parts.append(f'<text x="{left + inner_w / 2:.1f}" y="{height - 4}" text-anchor="middle" font-size="11">'
                 f'{_e(unit)}{" (log scale)" if scale.startswith("log") else ""}</text></svg>')
    return "".join(parts)


def _legend(names: list[str]) -> str:
    return "<div class=legend>" + "".join(
        f'<span><i style="background:{COLORS.get(n, COLORS["bar"])}"></i>{_e(n)}</span>' for n in names) + "</div>"


# -- tables ----------------------------------------------------------------------------------


def sortable_table(table_id: str, columns: list[tuple[str, str]], rows: list[dict[str, Any]],
                   formats: dict[str, str] | None = None) -> str:
    """A table whose headers sort it and whose text box filters it. columns: (key, title)."""
    formats = formats or {}
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            kind = formats.get(key, "")
            if kind == "pct":
                cells.append(f'<td class=n data-v="{"" if value is None else value}">{_pct(value)}</td>')
            elif kind == "code":
                cells.append(f"<td><code>{_e(value if value is not None else '')}</code></td>")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f'<td class=n data-v="{value}">{_num(value)}</td>')
            else:
                cells.append(f"<td>{_e(value if value is not None else '—')}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<input class=filter type=search placeholder="filter rows…" data-table="{table_id}" '
            f'data-count="{table_id}-count" aria-label="filter {table_id}"> '
            f'<span class=note id="{table_id}-count">{len(rows)} shown</span>'
            f'<div class=scroll><table class=sortable id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# -- markdown (the datasheet) ----------------------------------------------------------------


def _inline(text: str) -> str:
    text = _e(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown(text: str) -> str:
    """The small Markdown the datasheet uses: headings, bullet lists, paragraphs, code, bold."""
    out, in_list = [], False
    for line in text.splitlines():
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


# -- the page --------------------------------------------------------------------------------


def _reason_items(counts: dict[str, int] | None, reasons: dict[str, dict]) -> list[tuple[str, int, str]]:
    return [(code, n, reasons.get(code, {}).get("description", "")) for code, n in (counts or {}).items()]


def _reason_table(counts: dict[str, int] | None, reasons: dict[str, dict], total: int) -> str:
    if not counts:
        return ""
    rows = "".join(f"<tr><td><code>{_e(c)}</code></td><td>{_e(reasons.get(c, {}).get('stage', ''))}</td>"
                   f"<td class=n>{n:,}</td><td class=n>{_pct(n / total if total else None)}</td>"
                   f"<td>{_e(reasons.get(c, {}).get('description', ''))}</td></tr>" for c, n in counts.items())
    return ("<table><thead><tr><th>reason</th><th>stage</th><th>rows</th><th>of input</th><th>meaning</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _funnel(report: dict[str, Any]) -> str:
    steps = report["funnel"]
    top = steps[0]["count"] or 1
    width, row, label_w = 640, 30, 180
    parts = [f'<svg class=plot id=funnel role=img width="{width}" height="{row * len(steps)}" '
             f'viewBox="0 0 {width} {row * len(steps)}" xmlns="http://www.w3.org/2000/svg">']
    for i, step in enumerate(steps):
        w = max(1.0, (width - label_w - 110) * step["count"] / top)
        y = i * row
        parts.append(f'<g><title>{_e(step["label"])}: {step["count"]:,}</title>'
                     f'<text x="{label_w - 8}" y="{y + 19}" text-anchor="end" font-size="12">{_e(step["label"])}</text>'
                     f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}" fill="{COLORS["kept"]}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 19}" font-size="12">{step["count"]:,} '
                     f'({step["count"] / top:.1%})</text></g>')
    parts.append("</svg>")
    rows = []
    for step in steps[1:]:
        reasons = ", ".join(f"<code>{_e(c)}</code> {n:,}" for c, n in list(step["dropped"].items())[:12])
        rows.append(f"<tr><td>{_e(step['label'])}</td><td class=n>{step['count']:,}</td>"
                    f"<td class=n>{step['dropped_total']:,}</td><td>{reasons or '—'}</td></tr>")
    return ("".join(parts) + "<h3>Dropped at each step, by reason</h3><table><thead><tr><th>step</th><th>rows</th>"
            f"<th>dropped</th><th>reasons</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _distributions(report: dict[str, Any]) -> str:
    figures = []
    for name, dist in report["distributions"].items():
        title = f"{dist['label']}" + (f" ({dist['unit']})" if dist["unit"] else "")
        if not dist["recorded"]:
            figures.append(f"<figure data-plot={_e(name)}><figcaption>{_e(title)}</figcaption>"
                           "<p class=note>not recorded in this dataset's metadata</p></figure>")
            continue
        q = dist["quantiles"]
        stats = " · ".join(f"{s}: median {_num((q.get(s) or {}).get('median'))}, p10–p90 "
                           f"{_num((q.get(s) or {}).get('p10'))}–{_num((q.get(s) or {}).get('p90'))}"
                           for s in q if q.get(s))
        figures.append(f"<figure data-plot={_e(name)}><figcaption>{_e(title)}</figcaption>"
                       f"{histogram(dist['plot'], dist['scale'], dist['unit'])}"
                       f"{_legend(list(dist['plot']['series']))}<div class=note>{_e(stats)}</div></figure>")
    languages = report.get("languages")
    if languages:
        items = [(lang, n, f"kept {lang}") for lang, n in list(languages["kept"].items())[:15]]
        figures.append(f"<figure data-plot=language><figcaption>caption language (kept, top 15)</figcaption>"
                       f"{bar_chart(items, width=400)}</figure>")
    else:
        figures.append("<figure data-plot=language><figcaption>caption language</figcaption><p class=note>"
                       "not recorded (no decisions)</p></figure>")
    near = report.get("near_duplicates")
    if near and near["sizes"]:
        items = [(f"{size} images", n, "clusters of this size") for size, n in near["sizes"].items()]
        figures.append("<figure data-plot=near_duplicates><figcaption>near-duplicate cluster sizes (clusters)"
                       f"</figcaption>{bar_chart(items, width=400)}<div class=note>{near['clusters']:,} clusters, "
                       f"{near['rejected']:,} rows rejected as near duplicates</div></figure>")
    else:
        figures.append("<figure data-plot=near_duplicates><figcaption>near-duplicate cluster sizes</figcaption>"
                       f"<p class=note>{'none found' if near else 'not recorded (no decisions)'}</p></figure>")
    opt = report["opt_out"]
    items = [(d, n, "opt-out directive") for d, n in opt["by_directive"].items()]
    items += [(f"@ {d['domain']}", d["opt_out"], "opt-outs from this domain") for d in opt["top_domains"][:5]]
    figures.append(f"<figure data-plot=opt_out><figcaption>opt-outs ({opt['rows']:,} rows)</figcaption>"
                   f"{bar_chart(items, color=COLORS['drop'], width=400) if items else '<p class=note>none</p>'}"
                   "</figure>")
    return "<div class=grid>" + "".join(figures) + "</div>"


SEARCH_URL = "http://127.0.0.1:8080/"  # apply.search --serve's default address


def _search_note(inputs: dict[str, Any]) -> str:
    """How to look at the samples themselves: the search and browse page of ``apply.search --serve``."""
    browse = (f" --pool {_e(inputs['pool'])} --decisions {_e(inputs['decisions'])}" if inputs.get("decisions") else "")
    return ("<p class=meta id=search-page>Look at the samples: embed them and index the embeddings "
            "(<code>make embed</code>, <code>make index</code>), then <code>make search ARGS=\"--index INDEX --serve"
            f"{browse}\"</code> serves a page to search them by text and to browse kept samples and examples of each "
            f"rejection reason, at <a href=\"{SEARCH_URL}\">{SEARCH_URL}</a>.</p>")


def render_page(report: dict[str, Any]) -> str:
    funnel = {s["step"]: s["count"] for s in report["funnel"]}
    reasons = report["reasons"]
    inputs = report["inputs"]
    train = report.get("train_shards")
    cards = [("input rows", funnel["input_rows"]), ("downloaded", funnel["downloaded"]), ("kept", funnel["kept"])]
    if train:
        cards += [("train samples", train["samples"]), ("train shards", train["count"])]
    cards.append(("domains", report["domains"]["distinct"]))
    domains = report["domains"]
    domain_items = [(d["domain"], d["rows"], f"success {_pct(d['success_rate'])}") for d in domains["top"][:20]]
    sections = [
        f"<h1>Dataset report: {_e(report['dataset'])}</h1>",
        f"<p class=meta>Generated {_e(report['generated_at'])} by webclip <code>{_e(report['code_version'])}</code> "
        f"from metadata only ({_e(inputs['layout'])} layout, {inputs['pool_shards']:,} pool shards). Pool "
        f"<code>{_e(inputs['pool'])}</code>; decisions <code>{_e(inputs['decisions'] or 'none')}</code>; train shards "
        f"<code>{_e(inputs['train'] or 'none')}</code>. The numbers are in <code>report.json</code>.</p>",
        _search_note(inputs),
        "".join(f"<p class=warning><b>Warning:</b> {_e(w)}</p>" for w in report.get("warnings", [])),
        "<div class=cards>" + "".join(f"<div class=card><b>{v:,}</b>{_e(k)}</div>" for k, v in cards) + "</div>",
        "<h2 id=funnel-h>Funnel</h2>", _funnel(report),
        "<h2>Download failures, by reason</h2>",
        bar_chart(_reason_items(report["failures"], reasons), color=COLORS["drop"]),
        _reason_table(report["failures"], reasons, funnel["input_rows"]),
    ]
    if report.get("unclassified_messages"):
        rows = "".join(f"<tr><td>{_e(m)}</td><td class=n>{n:,}</td></tr>"
                       for m, n in report["unclassified_messages"].items())
        sections.append("<h3>Unclassified error messages (img2dataset)</h3><table><thead><tr><th>message</th>"
                        f"<th>rows</th></tr></thead><tbody>{rows}</tbody></table>")
    sections += ["<h2>Filter rejections, by reason</h2>",
                 bar_chart(_reason_items(report["filter_rejections"], reasons), color=COLORS["drop"])
                 if report["filter_rejections"] is not None else "<p class=note>no decisions given: kept = downloaded"
                                                                 "</p>",
                 _reason_table(report["filter_rejections"], reasons, funnel["input_rows"])]
    note = "" if domains["exact"] else (f"<p class=note>More domains than the report holds: "
                                        f"{domains['rows_in_dropped_domains']:,} rows of the smallest were dropped.</p>")
    sections += [
        f"<h2>Top domains</h2><p class=note>{domains['distinct']:,} distinct domains. Success rate = downloaded / "
        "attempted.</p>" + note,
        bar_chart(domain_items),
        sortable_table("domains", [("domain", "domain"), ("rows", "rows"), ("attempted", "attempted"),
                                   ("downloaded", "downloaded"), ("success_rate", "success rate"), ("kept", "kept"),
                                   ("opt_out", "opt-outs")], domains["top"], {"success_rate": "pct"}),
        "<h2>Distributions</h2><p class=note>Downloaded samples and kept samples; images as found (before "
        "resizing).</p>", _distributions(report),
        "<h2>Pool shards</h2>",
        sortable_table("pool-shards", [("shard", "shard"), ("rows", "rows"), ("attempted", "attempted"),
                                       ("downloaded", "downloaded"), ("success_rate", "success rate"),
                                       ("kept", "kept"), ("keep_rate", "keep rate"), ("top_failure", "top failure"),
                                       ("duration_s", "duration (s)")],
                       report["pool_shards"], {"success_rate": "pct", "keep_rate": "pct"}),
    ]
    if train:
        sections += [f"<h2>Train shards</h2><p class=note>{train['count']:,} shards, {train['samples']:,} samples, "
                     f"{train['bytes'] or 0:,} bytes (manifest.json; check with <code>python -m shards.verify</code>)"
                     "</p>",
                     sortable_table("train-shards", [("name", "shard"), ("samples", "samples"), ("bytes", "bytes"),
                                                     ("sha256", "sha256")], train["shards"], {"sha256": "code"})]
    sections += ["<h2>Datasheet</h2><div class=datasheet>" + markdown(report["datasheet"]) + "</div>"]
    # JSON inside <script>: no "<", ">" or "&" may appear raw ("<!--", "</script>" would end or bend it).
    data = (json.dumps({"funnel": report["funnel"]}, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{_e(report['dataset'])}: dataset report</title><style>{_CSS}</style></head><body><main>"
            + "\n".join(sections)
            + f"</main><script type=application/json id=report-data>{data}</script>"
            f"<script>{_SCRIPT}</script></body></html>\n")

