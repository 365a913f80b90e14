"""A datasheet in the sections of "Datasheets for Datasets" (Gebru et al., 2018/2021).

Each section answers the paper's questions with what the pipeline recorded — counts,
sources, time span, configs, fingerprints — and marks every question it cannot answer
with ``UNKNOWN``, for the dataset's owners to fill in. It is rendered from the report's
numbers only, so it never disagrees with them.
"""

from __future__ import annotations

from typing import Any

UNKNOWN = "**Not known to the pipeline** — to be filled in by the dataset's owners."


def _pct(part: int | None, whole: int | None) -> str:
    return f"{part / whole:.1%}" if part is not None and whole else "n/a"


def _reasons(counts: dict[str, int] | None, limit: int = 8) -> str:
    if not counts:
        return "none"
    items = list(counts.items())
    text = ", ".join(f"`{code}` {n:,}" for code, n in items[:limit])
    return text + (f", and {len(items) - limit} more" if len(items) > limit else "")


def _config_line(config: dict | None, keys: tuple[str, ...]) -> str:
    if not config:
        return "not recorded"
    return ", ".join(f"`{k}={config[k]}`" for k in keys if k in config) or "not recorded"


def render_datasheet(report: dict[str, Any]) -> str:
    funnel = {s["step"]: s["count"] for s in report["funnel"]}
    rows, downloaded, kept = funnel["input_rows"], funnel["downloaded"], funnel["kept"]
    train = report.get("train_shards")
    final = train["samples"] if train else kept
    ingest, filt = report["configs"]["ingest"], report["configs"]["filter"]
    dists = report["distributions"]
    domains = report["domains"]
    lists = report.get("input_lists")
    collected = report["collected"]
    languages = (report.get("languages") or {}).get("kept") or {}
    near = report.get("near_duplicates") or {}
    clip = dists.get("clip_score", {})
    median = lambda name: (dists[name].get("quantiles") or {}).get("kept", {}) or {}

    lines = [f"# Datasheet: {report['dataset']}", "",
             f"Generated {report['generated_at']} by webclip `{report['code_version']}` from the pipeline's metadata "
             f"({report['inputs']['layout']} layout). Numbers come from `report.json` beside this file.", ""]

    lines += ["## Motivation", "",
              "- **For what purpose was the dataset created?** To pretrain image–text (CLIP-style) models: "
              "image–caption pairs collected from the web by webclip's ingest, filtered and sharded for training.",
              f"- **Who created it, on whose behalf, and who funded it?** {UNKNOWN}",
              f"- **Any other comments?** {UNKNOWN}", ""]

    lines += ["## Composition", "",
              "- **What do the instances represent?** An image found on a web page and the text that accompanied it "
              "(alt text or caption), with metadata: source URL, sizes, hashes, the filter's decision.",
              f"- **How many instances are there?** {final:,} in the final set"
              + (f" ({train['count']} train shards, {train['bytes'] or 0:,} bytes)" if train else "")
              + f", from {rows:,} input rows ({_pct(final, rows)}).",
              f"- **Is it a sample of a larger set?** It is what survived download and filtering of the input URL "
              f"lists: {downloaded:,} downloaded ({_pct(downloaded, funnel['attempted'])} of those attempted), "
              f"{kept:,} kept. How the input URL lists were drawn: {UNKNOWN}",
              f"- **What data does each instance consist of?** The image (as re-encoded by ingest: "
              f"{_config_line(ingest, ('image_size', 'resize_mode', 'encode_format', 'encode_quality'))}), its caption "
              "(UTF-8 text) and a JSON/parquet metadata row.",
              "- **Is there a label or target?** No labels: the caption is the supervision. It is unverified web "
              "text" + (f"; median length {median('caption_words').get('median')} words" if median('caption_words')
                        else "") + ".",
              "- **Is any information missing from instances?** Every input row has a pool row; the rows that did "
              f"not become samples keep their reason. Download failures: {_reasons(report['failures'])}.",
              "- **Are relationships between instances explicit?** Duplicates are: each rejected duplicate names the "
              "copy kept (`dup_of` in the decisions)"
              + (f"; {near.get('clusters', 0):,} near-duplicate clusters, {near.get('rejected', 0):,} rows rejected"
                 if near else "") + ".",
              "- **Are there recommended data splits?** None are made here; evaluation data should be held out "
              "by the user (the filter can drop look-alikes of an evaluation set: `decontaminate`).",
              "- **Are there errors, sources of noise, or redundancies?** Captions are noisy web text"
              + (f"; CLIP scores recorded (median of kept {((clip.get('quantiles') or {}).get('kept') or {}).get('median')})"
                 if clip.get("recorded") else "; no CLIP score was recorded, so image–caption agreement is unmeasured")
              + ". Exact and near duplicates were removed by the filter where enabled.",
              f"- **Is the dataset self-contained?** The samples are stored in the shards, but they are copies of "
              f"third-party content from {domains['distinct']:,} domain{'s' if domains['distinct'] != 1 else ''}; "
              "the URLs may stop working or change. "
              "Rights to the content: " + UNKNOWN,
              f"- **Does it contain confidential, offensive or sensitive data, or data about people?** {UNKNOWN} "
              "The pipeline does not detect faces, personal data, NSFW or offensive content.",
              "- **Languages of the captions (kept):** "
              + (", ".join(f"{lang} {n:,}" for lang, n in list(languages.items())[:8]) if languages
                 else "not recorded") + ".", ""]

    lines += ["## Collection process", "",
              "- **How was the data acquired?** Downloaded over HTTP(S) by webclip's ingest from URL lists"
              + (": " + "; ".join(f"`{x['path']}` ({x.get('bytes') or '?'} bytes, "
                                   f"{('sha256 ' + x['sha256'][:16] + '…') if x.get('sha256') else 'etag ' + str(x.get('etag'))})"
                                   for x in lists[:5]) if lists else " (not recorded for this folder)") + ".",
              "- **What mechanisms were used?** Async HTTP with per-host limits, an honest User-Agent, robots "
              "opt-outs honoured: responses carrying `X-Robots-Tag: noai / noimageai` were not stored "
              f"({report['opt_out']['rows']:,} rows); private and link-local addresses refused. "
              + _config_line(ingest, ("user_agent_token", "timeout", "retries", "max_bytes")) + ".",
              f"- **Over what time frame?** Shards written from {collected['first_shard_started'] or 'unknown'} to "
              f"{collected['last_shard_ended'] or 'unknown'}. When the pages were created: {UNKNOWN}",
              f"- **Who was involved, and were they compensated?** {UNKNOWN}",
              f"- **Were ethical review processes conducted?** {UNKNOWN}",
              f"- **Were the people pictured or the site owners notified or asked for consent?** {UNKNOWN} Only "
              "machine-readable opt-outs were honoured.", ""]

    lines += ["## Preprocessing, cleaning, labeling", "",
              f"- **Before download:** rows not unique (same URL and caption earlier): "
              f"{_reasons(report['not_unique'])}; rows not requested: {_reasons(report['not_attempted'])}.",
              "- **Filter rules and their rejections:** "
              + (_reasons(report["filter_rejections"]) if report["filter_rejections"] is not None
                 else "no decisions were given: every downloaded sample counts as kept") + ".",
              "- **Filter settings:** "
              + _config_line(filt, ("min_caption_chars", "min_caption_words", "languages", "min_image_size",
                                    "max_aspect_ratio", "dedupe_url", "dedupe_exact", "dedupe_near",
                                    "near_dup_threshold", "clip_threshold", "clip_top_fraction",
                                    "decontaminate")) + ".",
              "- **Is the raw data saved?** The pool keeps one row per input row, failures included, with its "
              "reason; decisions keep a row per pool row. Original image bytes are not kept (only the resized copy).",
              "- **Is the software available?** webclip, version above.", ""]

    lines += ["## Uses", "",
              "- **Intended use:** research pretraining of image–text models.",
              f"- **Has it been used for tasks already?** {UNKNOWN}",
              "- **Uses to avoid / risks:** web captions carry the biases of the sites they come from "
              f"(top domain share: {_pct(domains['top'][0]['rows'] if domains['top'] else None, rows)}); "
              f"{UNKNOWN}", ""]

    lines += ["## Distribution", "",
              f"- **Will it be distributed, how, under what license or terms?** {UNKNOWN}",
              "- **Integrity:** `manifest.json` lists every shard's bytes and sha256; `python -m shards.verify` "
              "checks a copy against it.", ""]

    lines += ["## Maintenance", "",
              f"- **Who maintains it and how can they be contacted?** {UNKNOWN}",
              "- **Versioning:** the manifest records the code version, the config and fingerprints of the pool, "
              "decisions and input lists; any change gives a different manifest.",
              f"- **Will it be updated, and how are removal requests handled?** {UNKNOWN}", ""]
    return "\n".join(lines)
