"""Parquet request bodies for the tests: a crafted decompression bomb, and plain frames."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def parquet_bomb(rows: int, groups: int = 10) -> bytes:
    """A few KB of parquet holding ``rows`` identical rides: one dictionary entry per column and
    run-length encoded indices, ``groups`` row groups (how a crafted body expands)."""
    per_group = rows // groups
    zeros = pa.array(np.zeros(per_group, dtype=np.int8))

    def column(value, type_):
        return pa.DictionaryArray.from_arrays(zeros, pa.array([value], type=type_))

    table = pa.table({"PULocationID": column(43, pa.int64()),
                      "DOLocationID": column(151, pa.int64()),
                      "trip_distance": column(1.8, pa.float64())})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd", write_statistics=False,
                          store_schema=False, max_rows_per_page=per_group,
                          data_page_size=1 << 30) as writer:
        for _ in range(groups):
            writer.write_table(table, row_group_size=per_group)
    return buf.getvalue()


def to_parquet(df: pd.DataFrame, **kwargs) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, **kwargs)
    return buf.getvalue()
