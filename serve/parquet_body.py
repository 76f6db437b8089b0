"""Parquet request bodies read without trusting them (a few KB can claim 100M rows).

A parquet file says in its footer how many rows and columns it holds, how each column chunk
is compressed and how many bytes it takes; dictionary and run-length pages let a few bytes
stand for millions of values, and zstd, brotli or gzip pages expand up to tens of thousands
of times. So before a single page is read:

* the footer's row count (total and per column chunk) is checked against ``max_rows`` and
  its column count against :data:`MAX_COLUMNS` (413);
* only the columns the model reads are decoded (extra columns never are, as MLflow ignores
  them too), and they must be flat columns of fixed-width values (numbers, booleans): a
  string column is refused as MLflow refuses it, before its dictionary can expand;
* the worst-case decoded size of those columns (rows x value width, plus each chunk's
  compressed size x its codec's largest expansion ratio) must stay under
  :data:`MAX_DECODED_BYTES` (413: send it uncompressed or snappy-compressed, as pandas,
  pyarrow, Spark and DuckDB write by default).

pyarrow checks that every page decompresses to the size its header declares, so a page
cannot write more than its compressed bytes times the codec's ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

from serve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

MAX_COLUMNS = 1_000
MAX_DECODED_BYTES = 64 << 20
# Largest output per input byte of each codec's format: snappy copies 64 bytes for a 3-byte
# tag; LZ4 adds at most 255 bytes per length byte; deflate ~1032x; a zstd RLE block gives
# 128 KiB for 4 bytes. Brotli (and LZO, which pyarrow cannot read) have no small bound.
CODEC_MAX_EXPANSION = {"UNCOMPRESSED": 1, "SNAPPY": 22, "LZ4": 256, "LZ4_RAW": 256,
                       "GZIP": 1_100, "ZSTD": 32_768}
VALUE_WIDTH = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}


def read_parquet_body(body: bytes, columns: Sequence[str], max_rows: int):
    """The ``columns`` of a parquet body present in it, as a pandas DataFrame, after the
    footer checks above; MalformedRequest-like InvalidInput, PayloadTooLarge (413) or
    UnsupportedMediaType (415) otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(body))  # reads the footer, no page
    except Exception as e:  # noqa: BLE001 - not parquet, truncated, corrupt footer
        raise InvalidInput(f"cannot read the parquet body: {type(e).__name__}: {e}") from e
    meta = pf.metadata
    rows = max(meta.num_rows, sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    if rows > max_rows:
        raise PayloadTooLarge(f"the parquet body holds {rows} rows; the limit is {max_rows}")
    if meta.num_columns > MAX_COLUMNS:
        raise PayloadTooLarge(f"the parquet body has {meta.num_columns} columns; the limit is "
                              f"{MAX_COLUMNS}")
    leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    wanted = [c for c in columns if c in pf.schema_arrow.names]
    decoded = 0
    for name in wanted:
        i = leaves.get(name)
        leaf = meta.schema.column(i) if i is not None else None
        if leaf is None or leaf.max_repetition_level > 0:
            raise InvalidInput(f"column {name!r} of the parquet body is not a flat column",
                               field=name)
        width = VALUE_WIDTH.get(leaf.physical_type)
        if width is None:
            raise InvalidInput(f"column {name!r} of the parquet body holds "
                               f"{leaf.physical_type} values; the model takes numbers",
                               field=name)
        decoded += rows * width
        for g in range(meta.num_row_groups):
            chunk = meta.row_group(g).column(i)
            if chunk.num_values > max_rows:
                raise PayloadTooLarge(f"column {name!r} of the parquet body holds "
                                      f"{chunk.num_values} values; the limit is {max_rows}")
            ratio = CODEC_MAX_EXPANSION.get(chunk.compression)
            if ratio is None:
                raise UnsupportedMediaType(
                    f"parquet compression {chunk.compression} is not accepted (its expansion "
                    f"has no small bound); use snappy, zstd, gzip, lz4 or none")
            decoded += min(chunk.total_compressed_size, len(body)) * ratio
    if decoded > MAX_DECODED_BYTES:
        raise PayloadTooLarge(
            f"the parquet body may decode to {decoded >> 20} MiB (its compressed pages can "
            f"expand that much); the limit is {MAX_DECODED_BYTES >> 20} MiB: send it "
            f"uncompressed or snappy-compressed")
    try:
        return pf.read(columns=wanted, use_pandas_metadata=False).to_pandas()
    except Exception as e:  # noqa: BLE001 - corrupt pages
        raise InvalidInput(f"cannot read the parquet body: {type(e).__name__}: {e}") from e
