"""Decide, before any request, which input rows are not worth their download.

Downloading is the expensive step, so the cheap rejections happen first, in the
driver, as shards are read: a row whose (normalised URL, caption) pair already
appeared earlier in the job — in any earlier input file or shard, not only its own
shard — is ``dup_url``, and a caption that is missing, boilerplate or too short
fails ``core.captions.caption_reason``. Such a row still becomes its pool row
(img2dataset's contract: one row per input row), through ``ShardInput.row_errors``
like the reader's own flags, and is counted in ``_stats.json``; it is never fetched.

The marks depend only on the input, in input order: the same for every distributor,
every partition count and on a resumed run, because the repeats are found over every
shard of the job — committed ones included — before any is skipped or downloaded
(``ingest.dedupe``: a sort/partition pass on the executor's workers), and the caption
rules look at one row at a time.

A repeated URL with another caption is downloaded again on purpose: the pair may
be another sample, and the filter, with the bytes in hand, decides what to keep.

Memory stays constant in the input size here too: no process holds the job's
fingerprints (``ingest.dedupe`` spills them, partitioned, to the output folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from core.captions import caption_reason
from core.reasons import Reason
from core.urls import normalize_url
from ingest.reader import ShardInput

DUPLICATE_DETAIL = "same URL and caption as an earlier row"


@dataclass(frozen=True)
class PlanRules:
    """What the planner checks; built by ``IngestConfig.plan_rules()``."""

    dedupe_url_caption: bool = True
    check_captions: bool = True  # False when the input has no caption column: a URL-only list is valid
    min_caption_chars: int = 5
    min_caption_words: int = 2
    reject_boilerplate_captions: bool = True

    @property
    def active(self) -> bool:
        return self.dedupe_url_caption or self.check_captions


def fingerprint(url: str, caption: str | None) -> bytes:
    """8 bytes of BLAKE2b over the normalised URL and the exact caption.

    With n distinct pairs in a job, the chance that two share a fingerprint — so
    that a row is wrongly marked ``dup_url`` — is about n² / 2⁶⁵, which is also the
    expected number of such rows: 3·10⁻⁶ at 10M rows, 3·10⁻⁴ at 100M, 0.03 at 1B.
    """
    try:
        url = normalize_url(url)
    except ValueError:  # unsplittable: deduped as written; the fetcher calls it invalid_url
        url = url.strip()
    key = f"{url}\0{caption or ''}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(key, digest_size=8).digest()


class Planner:
    """Marks the rows of each shard, in shard order, that are not worth downloading.

    Takes each shard's repeated rows from ``ingest.dedupe`` (``duplicates``) and applies
    the caption rules; counts its marks per reason (``marked``). A row the reader already
    flagged keeps its reason and is not fingerprinted (its text is a repair, not the
    input); a row without a URL is left for the worker (``invalid_url``). Of a duplicate
    that also has a bad caption, ``dup_url`` is reported, in the filter's order.
    """

    def __init__(self, rules: PlanRules) -> None:
        self.rules = rules
        self.marked: Counter[str] = Counter()
        self._details = {
            Reason.CAPTION_MISSING: "no caption text (decided before download)",
            Reason.CAPTION_BOILERPLATE: "a file name or generic word, not a description (decided before download; "
            "--reject_boilerplate_captions false keeps it)",
            Reason.CAPTION_SHORT: f"fewer than {rules.min_caption_chars} characters or {rules.min_caption_words} "
            "words (decided before download; see --min_caption_chars, --min_caption_words)",
        }

    def plan(self, shard: ShardInput, duplicates: Iterable[int] = ()) -> ShardInput:
        """``shard`` with the planner's marks added to its ``row_errors``; ``duplicates``: its rows
        whose (URL, caption) pair appeared earlier in the job (``ingest.dedupe.DuplicateMarks``)."""
        if not self.rules.active:
            return shard
        errors = dict(shard.row_errors)
        if self.rules.dedupe_url_caption:
            for i in duplicates:
                errors[int(i)] = (Reason.DUP_URL, DUPLICATE_DETAIL)
                self.marked[Reason.DUP_URL.value] += 1
        if self.rules.check_captions:
            rules = self.rules
            for i in eligible_rows(shard):
                if i in errors:
                    continue
                reason = caption_reason(shard.captions[i], rules.min_caption_chars, rules.min_caption_words,
                                        rules.reject_boilerplate_captions)
                if reason is not None:
                    errors[i] = (reason, self._details[reason])
                    self.marked[reason.value] += 1
        if len(errors) == len(shard.row_errors):
            return shard
        return dataclasses.replace(shard, row_errors=dict(sorted(errors.items())))


def eligible_rows(shard: ShardInput) -> list[int]:
    """The rows the planner judges: with a URL, not flagged by the reader."""
    flagged = shard.row_errors
    return [i for i, url in enumerate(shard.urls) if url and i not in flagged and not url.isspace()]
