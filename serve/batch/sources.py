"""Readers: every source yields Arrow tables with :data:`~serve.batch.coerce.CHUNK_COLUMNS`.

A TLC parquet month (local, ``s3://``, ``https://``) read in row batches, or a
PostgreSQL table streamed through a server-side cursor; both pass their columns through
:func:`serve.batch.coerce.coerce_table` (the one place column types are converted), so
the core sees one shape. Whatever goes wrong with the input (no such file, a file that is
not parquet or is cut short, duplicated columns, no such table, a refused login) is an
:class:`~serve.errors.InvalidInput` of one line naming the input, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import pandas as pd
import pyarrow as pa

from serve.batch.coerce import CHUNK_COLUMNS, DROPOFF, PICKUP, coerce_table, is_date_only
from serve.batch.months import is_database, parse_month
from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS
from serve.urls import masked

log = logging.getLogger(__name__)


@dataclass
class Source:
    """An opened input: its total row count (for progress) and a chunk iterator factory."""

    uri: str  # as shown: no password
    rows: int | None
    chunks: Callable[[], Iterator[pa.Table]]


def _normalize(table: pa.Table, pickup: str, dropoff: str) -> pa.Table:
    return coerce_table(table.rename_columns(
        [PICKUP if c == pickup else DROPOFF if c == dropoff else c for c in table.column_names]
    ).select(list(CHUNK_COLUMNS)))


def _warn_date_only(shown: str, types: dict[str, pa.DataType]) -> None:
    dates = [name for name, typ in types.items() if is_date_only(typ)]
    if dates:
        log.warning("%s: %s %s a date without a time of day: rides are scored, but their "
                    "actual duration is unknown (null) and the month is not evaluated",
                    shown, " and ".join(dates), "is" if len(dates) == 1 else "are")


def parquet_source(uri: str, batch_rows: int) -> Source:
    """A TLC parquet month (local, s3://, https://) read ``batch_rows`` at a time."""
    from serve.tlc import first_line, open_parquet, trip_columns

    shown = masked(uri)
    with open_parquet(uri) as pf:
        schema = pf.schema_arrow
        pickup, dropoff = trip_columns(schema.names, shown)
        rows = pf.metadata.num_rows
    _warn_date_only(shown, {c: schema.field(c).type for c in (pickup, dropoff)})
    columns = [pickup, dropoff, *RIDE_COLUMNS]

    def chunks() -> Iterator[pa.Table]:
        # Opened per call and closed when the chunks stop, early or not (https is cached).
        with open_parquet(uri) as f:
            batches = f.iter_batches(batch_size=batch_rows, columns=columns)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except (OSError, pa.ArrowException) as e:  # a corrupt or cut page
                    raise InvalidInput(f"{shown}: cannot read the file: {first_line(e)}") from e
                yield _normalize(pa.Table.from_batches([batch]), pickup, dropoff)

    return Source(shown, rows, chunks)


def _database_parts(uri: str, month: str | None) -> tuple[str, str, str]:
    """Split a table URL into (SQLAlchemy URL without our parameters, table, month)."""
    parsed = urlparse(uri)
    query = dict(parse_qsl(parsed.query))
    table = query.pop("table", None)
    month = query.pop("month", None) or month
    if not table:
        raise InvalidInput(f"database input needs ?table=NAME: {masked(uri)}", field="table")
    if not month:
        raise InvalidInput("database input needs a month (?month=YYYY-MM or --month)",
                           field="month")
    parse_month(month)
    return urlunparse(parsed._replace(query=urlencode(query))), table, month


def _database_error(shown: str, table: str, error: Exception) -> InvalidInput:
    """One line for what the database said: no such table, login refused, unreachable."""
    import sqlalchemy as sa

    from serve.tlc import first_line

    if isinstance(error, sa.exc.NoSuchTableError):
        return InvalidInput(f"{shown}: no table {table!r} in that database", field="table")
    detail = first_line(getattr(error, "orig", None) or error).removeprefix("FATAL:").strip()
    hint = ""
    if "password" in detail:
        hint = " (the password comes from PGPASSWORD, ~/.pgpass or PGPASSWORD in .env)"
    return InvalidInput(f"{shown}: cannot read table {table!r}: {masked(detail)}{hint}",
                        field="--input")


def database_source(uri: str, month: str | None, batch_rows: int,
                    password: str | None = None) -> Source:
    """Rides of one month from a PostgreSQL table, streamed through a server-side cursor.

    Rows are filtered on the pickup column (``pickup >= month start and < next month``) and
    ordered by all the columns read, so row positions (hence ride ids) are stable. The
    password is the URL's, else ``password``, else libpq's own (``PGPASSWORD``,
    ``~/.pgpass``).
    """
    import sqlalchemy as sa

    from serve.tlc import trip_columns

    url, table_name, month = _database_parts(uri, month)
    shown = f"{masked(urlunparse(urlparse(url)._replace(query='')))}?table={table_name}" \
            f"&month={month}"
    schema, _, name = table_name.rpartition(".")
    connect_args = {"password": password} if password and not urlparse(url).password else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    try:
        table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
        pickup, dropoff = trip_columns(table.columns.keys(), shown)
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
    except sa.exc.SQLAlchemyError as e:
        engine.dispose()
        raise _database_error(shown, table_name, e) from e
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
                    # Types as the driver gives them (NUMERIC -> Decimal, text, date...),
                    # then the same coercion as parquet.
                    yield coerce_table(pa.table({
                        name: pa.array(v) for name, v in zip(CHUNK_COLUMNS, values,
                                                             strict=True)}))
        except sa.exc.SQLAlchemyError as e:
            raise _database_error(shown, table_name, e) from e
        finally:  # also when the consumer stops early or fails (generator closed)
            engine.dispose()

    return Source(shown, rows, chunks)


def open_source(uri: str, month: str | None, batch_rows: int,
                password: str | None = None) -> Source:
    """The reader for ``uri``: a PostgreSQL table or a parquet file."""
    if is_database(uri):
        return database_source(uri, month, batch_rows, password)
    return parquet_source(uri, batch_rows)
