"""The live progress bar: samples/s and success rate while shards are still in flight.

Shard workers report their running counts (rows done, successes) through whatever
channel their distributor offers — a direct call inline, a queue from a process
pool, a tiny Ray actor from Ray tasks — and the driver folds them in here. Counts
are absolute per shard, so a late or repeated report is harmless; a shard's final
stats replace its running counts when it commits.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_enabled(setting: bool | None) -> bool:
    """``None`` means: only when someone is watching (stderr is a terminal)."""
    if setting is None:
        return sys.stderr.isatty()
    return setting


class Progress:
    def __init__(self, total: int | None, enabled: bool):
        self.enabled = enabled
        self._running: dict[int, tuple[int, int]] = {}
        self._finished: set[int] = set()
        self._count = self._successes = 0  # of finished shards
        self._shown = 0
        self._bar = tqdm(
            total=total, unit="sample", desc="ingest", disable=not enabled, smoothing=0.1,
            mininterval=0.5, file=sys.stderr, dynamic_ncols=True,
        )

    def shard_progress(self, shard_id: int, count: int, successes: int) -> None:
        """Running counts of a shard in flight."""
        if shard_id not in self._finished:
            self._running[shard_id] = (count, successes)
            self._refresh()

    def shard_done(self, stats: dict[str, Any]) -> None:
        """A shard committed (or was found committed): its final counts."""
        shard_id = int(stats["shard"])
        self._running.pop(shard_id, None)
        if shard_id not in self._finished:
            self._finished.add(shard_id)
            self._count += stats["count"]
            self._successes += stats["successes"]
        self._refresh()

    @property
    def counts(self) -> tuple[int, int]:
        """(rows, successes) so far, finished and running shards together."""
        count = self._count + sum(c for c, _ in self._running.values())
        successes = self._successes + sum(s for _, s in self._running.values())
        return count, successes

    def _refresh(self) -> None:
        if not self.enabled:
            return
        count, successes = self.counts
        self._bar.set_postfix(ok=f"{successes / max(count, 1):.1%}", shards=len(self._finished), refresh=False)
        if count > self._shown:  # a retried shard may restart lower; never run the bar backwards
            self._bar.update(count - self._shown)
            self._shown = count

    def close(self) -> None:
        self._bar.close()
