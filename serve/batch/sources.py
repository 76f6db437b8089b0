"""Readers: every source yields Arrow tables with :data:`~serve.batch.core.CHUNK_COLUMNS`.

A TLC parquet month (local, ``s3://``, ``https://``) read in row batches, or a
PostgreSQL table streamed through a server-side cursor; type coercion (pickup and
dropoff names, NUMERIC -> float) happens here, so the core sees one shape.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from serve.batch.core import CHUNK_COLUMNS, DROPOFF, PICKUP
from serve.batch.months import is_database, parse_month
from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS


@dataclass
class Source:
    """An opened input: its total row count (for progress) and a chunk iterator factory."""

    uri: str
    rows: int | None
    chunks: Callable[[], Iterator[pa.Table]]


def _normalize(table: pa.Table, pickup: str, dropoff: str) -> pa.Table:
    return table.rename_columns(
        [PICKUP if c == pickup else DROPOFF if c == dropoff else c for c in table.column_names]
    ).select(list(CHUNK_COLUMNS))


def parquet_source(uri: str, batch_rows: int) -> Source:
    """A TLC parquet month (local, s3://, https://) read ``batch_rows`` at a time."""
    from serve.tlc import open_parquet, trip_columns

    with open_parquet(uri) as pf:
        pickup, dropoff = trip_columns(pf.schema_arrow.names, uri)
        rows = pf.metadata.num_rows
    columns = [pickup, dropoff, *RIDE_COLUMNS]

    def chunks() -> Iterator[pa.Table]:
        # Opened per call and closed when the chunks stop, early or not (https is cached).
        with open_parquet(uri) as f:
            for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
                yield _normalize(pa.Table.from_batches([batch]), pickup, dropoff)

    return Source(uri, rows, chunks)


def _database_parts(uri: str, month: str | None) -> tuple[str, str, str]:
    """Split a table URL into (SQLAlchemy URL without our parameters, table, month)."""
    parsed = urlparse(uri)
    query = dict(parse_qsl(parsed.query))
    table = query.pop("table", None)
    month = query.pop("month", None) or month
    if not table:
        raise InvalidInput(f"database input needs ?table=NAME: {parsed.scheme}://...",
                           field="table")
    if not month:
        raise InvalidInput("database input needs a month (?month=YYYY-MM or --month)",
                           field="month")
    parse_month(month)
    return urlunparse(parsed._replace(query=urlencode(query))), table, month


def _plain_number(arr: pa.Array) -> pa.Array:
    """NUMERIC columns arrive as Decimal: make them floats, as validation expects numbers."""
    return pc.cast(arr, pa.float64()) if pa.types.is_decimal(arr.type) else arr


def database_source(uri: str, month: str | None, batch_rows: int) -> Source:
    """Rides of one month from a PostgreSQL table, streamed through a server-side cursor.

    Rows are filtered on the pickup column (``pickup >= month start and < next month``) and
    ordered by all the columns read, so row positions (hence ride ids) are stable.
    """
    import sqlalchemy as sa

    from serve.tlc import trip_columns

    url, table_name, month = _database_parts(uri, month)
    schema, _, name = table_name.rpartition(".")
    engine = sa.create_engine(url)
    try:
        table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
        pickup, dropoff = trip_columns(table.columns.keys(), f"table {table_name!r}")
        year, mm = parse_month(month)
        start = pd.Timestamp(year=year, month=mm, day=1)
        end = start + pd.offsets.MonthBegin(1)
        cols = [table.c[pickup], table.c[dropoff], *(table.c[c] for c in RIDE_COLUMNS)]
        where = sa.and_(table.c[pickup] >= start.to_pydatetime(),
                        table.c[pickup] < end.to_pydatetime())
        rows = None
        if sys.stderr.isatty():  # the count only feeds the progress bar, shown on a terminal
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(where)).scalar()
    except BaseException:
        engine.dispose()
        raise

    def chunks() -> Iterator[pa.Table]:
        stmt = sa.select(*cols).where(where).order_by(*cols)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True,
                                                max_row_buffer=batch_rows).execute(stmt)
                for part in result.partitions(batch_rows):
                    values = list(zip(*part, strict=True))
                    yield pa.table({
                        PICKUP: pa.array(values[0], pa.timestamp("us")),
                        DROPOFF: pa.array(values[1], pa.timestamp("us")),
                        **{c: _plain_number(pa.array(v))
                           for c, v in zip(RIDE_COLUMNS, values[2:], strict=True)},
                    })
        finally:  # also when the consumer stops early or fails (generator closed)
            engine.dispose()

    # Shown in logs and runs: no user or password.
    parsed = urlparse(url)
    host = f"{parsed.hostname}:{parsed.port}" if parsed.port else (parsed.hostname or "")
    shown = urlunparse(parsed._replace(netloc=host, query=""))
    return Source(f"{shown}?table={table_name}&month={month}", rows, chunks)


def open_source(uri: str, month: str | None, batch_rows: int) -> Source:
    """The reader for ``uri``: a PostgreSQL table or a parquet file."""
    if is_database(uri):
        return database_source(uri, month, batch_rows)
    return parquet_source(uri, batch_rows)

