"""Score the filter's decisions against the demo corpus's ground truth.

The corpus planted every near duplicate and every mismatched caption itself, so the
filter can be graded row by row: recall (planted rows caught) and precision (rows
caught that were planted). Pool row ``i`` in key order is URL-list row ``i``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.layout import shard_name
from infra.local.corpus import load_ground_truth


@dataclass
class Grade:
    planted: int  # rows of the planted kind that reached the rule
    caught: int  # rows the rule rejected
    true_positives: int

    @property
    def recall(self) -> float:
        return self.true_positives / self.planted if self.planted else 1.0

    @property
    def precision(self) -> float:
        return self.true_positives / self.caught if self.caught else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "recall": round(self.recall, 4), "precision": round(self.precision, 4)}


def decisions_table(decisions: str) -> pa.Table:
    tables = []
    for shard_id in sorted(committed_shards_of_decisions(decisions)):
        with storage.open_file(storage.join(decisions, f"{shard_name(shard_id)}.parquet")) as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables).sort_by("key")


def committed_shards_of_decisions(decisions: str) -> list[int]:
    from core.layout import shard_id_of

    return sorted({i for i in (shard_id_of(p) for p in storage.list_files(decisions, ".parquet")) if i is not None})


def joined(decisions: str, corpus_dir: str):
    truth = load_ground_truth(corpus_dir).to_pylist()
    rows = decisions_table(decisions).to_pylist()
    if len(rows) != len(truth):
        raise ValueError(f"{len(rows)} decisions but {len(truth)} ground-truth rows")
    return list(zip(rows, truth))


def grade_near_duplicates(decisions: str, corpus_dir: str) -> Grade:
    """dup_near decisions against planted near duplicates (those whose original was kept)."""
    pairs = joined(decisions, corpus_dir)
    kept_paths = {t["path"] for d, t in pairs if d["keep"]}
    planted = [d for d, t in pairs if t["kind"] == "dup_near" and t["group"] in kept_paths
               and (d["reason"] in (None, "dup_near"))]
    caught = [t for d, t in pairs if d["reason"] == "dup_near"]
    tp = sum(1 for t in caught if t["kind"] == "dup_near")
    return Grade(planted=len(planted), caught=len(caught), true_positives=tp)


def grade_mismatches(decisions: str, corpus_dir: str) -> dict:
    """The CLIP-score rule: planted mismatched captions removed, correct captions kept.

    Counted over rows that reached the rule (no earlier reason); "correct" rows are
    the clean scene images with their true caption.
    """
    pairs = joined(decisions, corpus_dir)
    reached = [(d, t) for d, t in pairs if d["reason"] in (None, "low_clip_score")]
    mismatched = [d for d, t in reached if t["kind"] == "mismatch"]
    correct = [d for d, t in reached if t["kind"] in ("clean", "redirect_ok")]
    removed = sum(1 for d in mismatched if d["reason"] == "low_clip_score")
    kept = sum(1 for d in correct if d["keep"])
    return {
        "mismatched": len(mismatched), "mismatched_removed": removed,
        "mismatched_removed_share": round(removed / max(1, len(mismatched)), 4),
        "correct": len(correct), "correct_kept": kept, "correct_kept_share": round(kept / max(1, len(correct)), 4),
    }
