"""Decide, before any request, which input rows are not worth their download.

Downloading is the expensive step, so the cheap rejections happen first, in the
driver, as shards are read: a row whose (normalised URL, caption) pair already
appeared earlier in the job — in any earlier input file or shard, not only its own
shard — is ``dup_url``, and a caption that is missing, boilerplate or too short
fails ``core.captions.caption_reason``. Such a row still becomes its pool row
(img2dataset's contract: one row per input row), through ``ShardInput.row_errors``
like the reader's own flags, and is counted in ``_stats.json``; it is never fetched.

The marks depend only on the input, in input order: the same for every distributor
and on a resumed run, as long as every shard — committed ones included — passes
through the same ``Planner`` in shard order (``ingest.run`` does this before it skips
committed shards).

A repeated URL with another caption is downloaded again on purpose: the pair may
be another sample, and the filter, with the bytes in hand, decides what to keep.

Memory is the one exception to "constant in the input size": the job-wide seen-set
grows by 8 bytes a row (``FingerprintSet``), the least a job-wide dedupe can hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

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


MAX_MERGED_RUN = 1 << 25  # values (256 MiB): bounds a merge's transient copy


class FingerprintSet:
    """A set of 64-bit fingerprints, compact enough to hold every row of a job.

    8 bytes a row (76 MiB at 10M rows, 763 MiB at 100M), kept as sorted ``uint64``
    runs, an LSM tree without the disk: each batch adds one run of its new values,
    and the two newest runs merge while the older is not larger than the newer (a
    binary counter), so there are about log2(rows / batch) runs, membership is one
    ``np.searchsorted`` per run, and each value is merged O(log rows) times.

    A merge briefly holds the merged run twice, so runs stop merging at
    ``max_run`` values: beyond it the big runs stay as they are (one more
    ``searchsorted`` each, per batch: 8 runs in all at 100M rows of 10k-row shards, 52 at 1B).
    """

    def __init__(self, max_run: int = MAX_MERGED_RUN) -> None:
        self._runs: list[np.ndarray] = []
        self._max_run = max_run

    def __len__(self) -> int:
        return sum(run.size for run in self._runs)

    @property
    def runs(self) -> int:
        return len(self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def add(self, fingerprints: np.ndarray) -> np.ndarray:
        """Add a batch, in row order; True where a value was already there.

        "Already there" includes an earlier position in the same batch: of equal
        values, only the first is new.
        """
        values, first = np.unique(np.asarray(fingerprints, dtype=np.uint64), return_index=True)
        known = self.contains(values)
        seen = np.ones(len(fingerprints), dtype=bool)
        seen[first[~known]] = False
        self._push(values[~known])
        return seen

    def contains(self, values: np.ndarray) -> np.ndarray:
        """Membership of each value (sorted values search fastest)."""
        values = np.asarray(values, dtype=np.uint64)
        found = np.zeros(values.size, dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, values)
            at[at == run.size] = run.size - 1  # runs are never empty
            found |= run[at] == values
        return found

    def _push(self, run: np.ndarray) -> None:
        if run.size == 0:
            return
        self._runs.append(run)
        while (
            len(self._runs) > 1
            and self._runs[-2].size <= self._runs[-1].size
            and self._runs[-2].size + self._runs[-1].size <= self._max_run
        ):
            newer, older = self._runs.pop(), self._runs.pop()
            merged = np.concatenate((older, newer))
            del older, newer
            merged.sort(kind="stable")  # two sorted runs back to back: timsort merges them in linear time
            self._runs.append(merged)


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

    Keeps the fingerprints of every row it judged so far (``FingerprintSet``) and
    counts its marks per reason (``marked``). A row the reader already flagged keeps
    its reason and is not remembered (its text is a repair, not the input); a row
    without a URL is left for the worker (``invalid_url``). Of a duplicate that also
    has a bad caption, ``dup_url`` is reported, in the filter's order.
    """

    def __init__(self, rules: PlanRules) -> None:
        self.rules = rules
        self.seen = FingerprintSet()
        self.marked: Counter[str] = Counter()
        self._details = {
            Reason.CAPTION_MISSING: "no caption text (decided before download)",
            Reason.CAPTION_BOILERPLATE: "a file name or generic word, not a description (decided before download; "
            "--reject_boilerplate_captions false keeps it)",
            Reason.CAPTION_SHORT: f"fewer than {rules.min_caption_chars} characters or {rules.min_caption_words} "
            "words (decided before download; see --min_caption_chars, --min_caption_words)",
        }

    def plan(self, shard: ShardInput) -> ShardInput:
        """``shard`` with the planner's marks added to its ``row_errors``."""
        if not self.rules.active:
            return shard
        errors = dict(shard.row_errors)
        flagged = shard.row_errors
        with_url = [i for i, url in enumerate(shard.urls) if url and i not in flagged and not url.isspace()]
        if self.rules.dedupe_url_caption and with_url:
            digests = b"".join(fingerprint(shard.urls[i], shard.captions[i]) for i in with_url)
            repeated = self.seen.add(np.frombuffer(digests, dtype="<u8"))
            for i in np.asarray(with_url)[repeated].tolist():
                errors[i] = (Reason.DUP_URL, DUPLICATE_DETAIL)
                self.marked[Reason.DUP_URL.value] += 1
        if self.rules.check_captions:
            rules = self.rules
            for i in with_url:
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
