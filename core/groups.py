"""The one rule every dedupe here keeps: of rows with equal keys, the first in job order wins.

Ingest's pre-download (URL, caption) dedupe (``ingest.dedupe``) and the filter's URL and
exact-bytes dedupes (``filter.run``) both decide with ``first_of_groups``: each row has an
id whose order is job order, and of each group of equal keys the smallest id is kept.
The minimum of a group does not depend on the order its members arrive in, so the
decisions do not depend on how rows are partitioned or how many workers run, as long
as a partition holds whole groups (rows routed by their key).
"""

from __future__ import annotations

import numpy as np


def first_of_groups(group_keys: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rejected row ids, their keeper's row id) for rows that repeat an earlier group key.

    ``group_keys`` is (n,) or (n, k) of unsigned integers (k columns, e.g. the two
    halves of a 128-bit digest); rows with equal keys form a group.
    """
    if len(row_ids) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    keys = group_keys.reshape(len(row_ids), -1)
    order = np.lexsort((row_ids, *[keys[:, c] for c in reversed(range(keys.shape[1]))]))
    sorted_keys = keys[order]
    sorted_ids = row_ids[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)
    keeper = sorted_ids[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    rejected = ~starts
    return sorted_ids[rejected], keeper[rejected]
