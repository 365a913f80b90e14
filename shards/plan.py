"""Which kept sample goes into which train shard: a pure function of counts and a seed.

Train shards must be of uniform size and mix samples from many pool shards (a pool
shard holds consecutive rows of the input list — often one site, one crawl day), and
the layout must be reproducible and resumable without holding a list of every
sample. So the plan is built from **counts only** (kept samples per pool shard):

1. the pool shards are put in a seeded random order and cut into *windows* of
   ``mix_window`` shards;
2. within a window, the kept samples of its shards are interleaved in a seeded
   random order (a shuffled sequence of shard labels: the i-th label says which
   shard's next kept sample comes i-th); windows follow each other, giving one
   global sample order;
3. train shard ``t`` takes global positions ``[t * s, (t + 1) * s)``: every shard has
   ``s = samples_per_shard`` samples except the last.

Any train shard's contents can be recomputed from the counts, the seed and ``t``
(``segments``): a task writing a range of train shards opens only the pool shards
its positions come from and skips to its first sample of each, and a rerun after a
crash rewrites exactly the missing shards, identically.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Segment:
    """The part of one window a range of global positions covers.

    ``labels[i]`` is the index (into ``pool_shards``) of the pool shard whose next kept
    sample comes i-th; ``skip[j]`` is how many kept samples of ``pool_shards[j]`` come
    before this segment (they belong to earlier train shards).
    """

    pool_shards: list[int]
    labels: np.ndarray
    skip: list[int]


@dataclass(frozen=True)
class ReshardPlan:
    pool_shards: list[int]  # pool shard ids, in window order (a seeded shuffle)
    kept: list[int]  # kept samples of each of them, in the same order
    samples_per_shard: int
    mix_window: int
    seed: int

    @classmethod
    def build(cls, kept_by_shard: dict[int, int], samples_per_shard: int, mix_window: int, seed: int) -> ReshardPlan:
        ids = sorted(kept_by_shard)
        order = np.random.default_rng([seed, 0x5EED]).permutation(len(ids)) if ids else []
        shuffled = [ids[i] for i in order]
        return cls(shuffled, [int(kept_by_shard[i]) for i in shuffled], samples_per_shard, mix_window, seed)

    # -- sizes ---------------------------------------------------------------------

    @cached_property  # read per train shard by every task
    def total(self) -> int:
        return sum(self.kept)

    @property
    def train_shards(self) -> int:
        return math.ceil(self.total / self.samples_per_shard)

    def shard_size(self, t: int) -> int:
        return min(self.samples_per_shard, self.total - t * self.samples_per_shard)

    @property
    def windows(self) -> int:
        return math.ceil(len(self.pool_shards) / self.mix_window)

    def _window_bounds(self) -> list[tuple[int, int]]:
        """(first global position, sample count) of each window."""
        bounds, start = [], 0
        for w in range(self.windows):
            size = sum(self.kept[w * self.mix_window : (w + 1) * self.mix_window])
            bounds.append((start, size))
            start += size
        return bounds

    # -- contents ------------------------------------------------------------------

    def window_order(self, w: int) -> np.ndarray:
        """Labels (0 .. shards in the window - 1) in the window's interleaved order."""
        counts = self.kept[w * self.mix_window : (w + 1) * self.mix_window]
        labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        return np.random.default_rng([self.seed, w]).permutation(labels)

    def segments(self, first: int, last: int) -> list[Segment]:
        """What train shards ``first .. last - 1`` hold, window by window, in order."""
        begin = first * self.samples_per_shard
        end = min(last * self.samples_per_shard, self.total)
        out = []
        for w, (start, size) in enumerate(self._window_bounds()):
            lo, hi = max(begin, start) - start, min(end, start + size) - start
            if lo >= hi:
                continue
            order = self.window_order(w)
            members = self.pool_shards[w * self.mix_window : (w + 1) * self.mix_window]
            skip = np.bincount(order[:lo], minlength=len(members)).tolist()
            out.append(Segment(members, order[lo:hi], skip))
        return out

    def units(self, max_shards: int) -> list[tuple[int, int]]:
        """Ranges of train shards for one task each: about one window per task.

        A task reads its window's pool shards once; cutting at the train shard where
        each window starts keeps the re-reading at window edges to one train shard's worth.
        """
        starts = sorted({start // self.samples_per_shard for start, size in self._window_bounds() if size} | {0})
        starts = [s for s in starts if s < self.train_shards]
        ranges = []
        for a, b in zip(starts, starts[1:] + [self.train_shards]):
            for lo in range(a, b, max_shards):
                ranges.append((lo, min(b, lo + max_shards)))
        return ranges

    # -- identity ------------------------------------------------------------------

    def describe(self) -> dict:
        return {
            "samples_per_shard": self.samples_per_shard,
            "mix_window": self.mix_window,
            "seed": self.seed,
            "total_samples": self.total,
            "train_shards": self.train_shards,
            "pool_shards": len(self.pool_shards),
        }

    def fingerprint(self) -> str:
        """Changes whenever any train shard's contents would."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
