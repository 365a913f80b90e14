"""Where a sample is rejected, and why: the rules, in the order that names the reason.

A row gets the **first** rule it fails, so the order is part of the contract:

    per row (``row_reason``, any order of work)      across rows (``filter.dedupe``)
    1. the download's own reason (ingest)            2. dup_url      first successful copy of a URL
    3. caption: missing, boilerplate, short                          (normalised) is kept
    4. language outside ``languages``               7. low_clip_score  below the threshold, or
    5. image: decode, too_small, aspect_ratio,                       outside the top fraction
       near_blank, hash_missing                    8. dup_exact    first acceptable copy of the
    6. eval_contaminated (pHash near an eval image)                 bytes (sha256) is kept
                                                   9. dup_near     first acceptable image of each
                                                                   pHash cluster is kept
                                                  10. dup_semantic first acceptable image of each
                                                                   cluster of close CLIP image
                                                                   embeddings is kept (off by default)

"First" is key order and "acceptable" means passing every earlier rule, so a kept
copy is always the first one that would have been kept on its own; the same pool
and config give the same decisions whatever the number of workers.
"""

from __future__ import annotations

from typing import Any

from core.captions import caption_reason
from core.reasons import Reason
from filter.config import FilterConfig
from filter.language import detect


def download_reason(row: dict[str, Any]) -> Reason | None:
    """Rows that failed in ingest keep their ingest reason."""
    if row["status"] == "success":
        return None
    try:
        return Reason(row["reason"])
    except ValueError:
        return Reason.DECODE_ERROR if row["status"] == "failed_to_resize" else Reason.CONNECTION_ERROR


def image_reason(row: dict[str, Any], cfg: FilterConfig) -> Reason | None:
    width = row.get("original_width") or row.get("width")
    height = row.get("original_height") or row.get("height")
    if not width or not height:
        return Reason.DECODE_ERROR
    if min(width, height) < cfg.min_image_size:
        return Reason.TOO_SMALL
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return Reason.ASPECT_RATIO
    spread = row.get("luma_std")
    if cfg.min_luma_std and spread is not None and spread < cfg.min_luma_std:
        return Reason.NEAR_BLANK
    return None


def row_reason(row: dict[str, Any], cfg: FilterConfig, hashes_ok: bool) -> tuple[Reason | None, str | None, float | None]:
    """Rules 1 and 3-5 for one pool row: (first failing reason, language, its confidence).

    ``hashes_ok``: the row carries a usable sha256 and pHash (rule 5's last check).
    Rule 6 needs the evaluation hashes and runs on whole shards (``filter.facts``).
    """
    reason = download_reason(row)
    language = confidence = None
    caption = row.get("caption")
    if reason is None:
        reason = caption_reason(caption, cfg.min_caption_chars, cfg.min_caption_words,
                                cfg.reject_boilerplate_captions)
    if reason is None and caption:
        language, confidence = detect(caption)
        if cfg.languages and language not in cfg.languages and confidence >= cfg.min_language_confidence:
            reason = Reason.LANGUAGE
    if reason is None:
        reason = image_reason(row, cfg)
    if reason is None and not hashes_ok:
        reason = Reason.HASH_MISSING
    return reason, language, confidence
