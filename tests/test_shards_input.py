"""shards/ names what it cannot read instead of failing deep inside."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.layout import POOL_SCHEMA
from shards.config import ShardsConfig
from shards.reshard import reshard


def test_a_parquet_format_pool_is_refused_with_a_clear_message(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=POOL_SCHEMA), pool / "00000.parquet")
    (pool / "00000_stats.json").write_text('{"count": 0, "successes": 0}')
    cfg = ShardsConfig(pool=str(pool), decisions=str(tmp_path / "decisions"), output_folder=str(tmp_path / "train"))
    with pytest.raises(SystemExit, match="00000.tar not found: shards/ reads webdataset pools"):
        reshard(cfg)
    assert not (tmp_path / "train").exists()
