"""Column types a TLC file or a database can carry -> the chunk's types, in one place.

Every reader (parquet, PostgreSQL, the Spark engine's validation UDF) passes its columns
through :func:`coerce_table`, so the core sees one shape whatever the source wrote:

* location ids: any integer width, float, decimal, strings (``"43"``), dictionary-encoded
  -> int64 (float64 from floats, decimals and strings: the core rejects non-integral ids);
* ``trip_distance``: float, integer, decimal (``NUMERIC``), strings -> float64;
* pickup/dropoff: timestamps in any unit, with a time zone (its wall clock, as TLC times
  are), ISO-8601 strings (one UTC offset: its wall clock; mixed offsets: UTC)
  -> ``timestamp("us")``; a date without a time (``date32``) keeps
  its day but makes the ride's duration unknown (no time of day, no duration).

A cell that cannot be read (``"abc"``, an unparseable timestamp) becomes null and its raw
value is kept in a ``_raw_<column>`` column, so the reject reason shows what the file
held. A column of a kind no conversion makes sense for (a list, a boolean id) is refused
whole with :class:`~serve.errors.InvalidInput` naming it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from serve.errors import InvalidInput
from serve.features import RIDE_COLUMNS

# Normalized chunk columns: every reader yields these, whatever the source calls them.
PICKUP, DROPOFF = "pickup_datetime", "dropoff_datetime"
CHUNK_COLUMNS = (PICKUP, DROPOFF, *RIDE_COLUMNS)
TIMESTAMP = pa.timestamp("us")
RAW = "_raw_"  # prefix of the column holding the raw text of cells that could not be read
_SHOWN_CHARS = 40


def raw_column(column: str) -> str:
    """Name of the column with the unreadable raw values of ``column``."""
    return f"{RAW}{column}"


def is_date_only(typ: pa.DataType) -> bool:
    """A date without a time of day (``date32``/``date64``): no duration can be computed."""
    return pa.types.is_date(typ)


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))


def _shown_text(values: np.ndarray, unreadable: np.ndarray) -> pa.Array:
    """The raw text of unreadable cells, as a reason shows it (repr, bounded); null elsewhere."""
    def show(v) -> str:
        r = repr(v)
        return r if len(r) <= _SHOWN_CHARS else f"{r[:_SHOWN_CHARS - 4]}...{r[-1]}"

    return pa.array([show(v) if bad else None for v, bad in zip(values, unreadable,
                                                                   strict=True)], pa.string())


def _parse_text(col: pa.ChunkedArray, parse) -> tuple[pa.Array, pa.Array | None]:
    """Strings -> values with ``parse`` (pandas, per cell, never raising); the raw text of the
    cells that did not parse."""
    text = col.to_numpy(zero_copy_only=False)
    parsed = parse(pd.Series(text, dtype=object).str.strip())
    unreadable = pd.notna(text) & pd.isna(parsed).to_numpy()
    return parsed, (_shown_text(text, unreadable) if unreadable.any() else None)


def _number(name: str, col: pa.ChunkedArray) -> tuple[pa.ChunkedArray | pa.Array,
                                                       pa.Array | None]:
    typ = col.type
    if pa.types.is_dictionary(typ):
        return _number(name, pc.cast(col, typ.value_type))
    if pa.types.is_null(typ):
        return pa.nulls(len(col), pa.float64()), None
    if pa.types.is_integer(typ):
        # uint64 beyond int64 stays representable as a float (and is then out of range).
        return pc.cast(col, pa.float64() if typ == pa.uint64() else pa.int64()), None
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return pc.cast(col, pa.float64()), None
    if _is_text(typ):
        parsed, raw = _parse_text(col, lambda s: pd.to_numeric(s, errors="coerce"))
        return pa.array(parsed.to_numpy(dtype=np.float64, na_value=np.nan), pa.float64(),
                        from_pandas=True), raw
    raise InvalidInput(f"column {name} is {typ}, not a number", field=name)


def _timestamp(name: str, col: pa.ChunkedArray) -> tuple[pa.ChunkedArray | pa.Array,
                                                          pa.Array | None]:
    typ = col.type
    if pa.types.is_dictionary(typ):
        return _timestamp(name, pc.cast(col, typ.value_type))
    if pa.types.is_null(typ):
        return pa.nulls(len(col), TIMESTAMP), None
    if pa.types.is_timestamp(typ):
        if typ.tz is not None:  # TLC times are wall-clock times: keep the zone's wall clock
            col = pc.local_timestamp(col)
        # ns -> us drops sub-microseconds (safe=False); s/ms -> us is exact.
        return col if col.type == TIMESTAMP else pc.cast(col, TIMESTAMP,
                                                         safe=typ.unit != "ns"), None
    if is_date_only(typ):
        return pc.cast(col, TIMESTAMP), None
    if _is_text(typ):
        def parse(s: pd.Series) -> pd.Series:
            try:  # one UTC offset (or none): its wall clock
                out = pd.to_datetime(s, errors="coerce", format="ISO8601")
            except ValueError:  # several offsets: one clock, UTC
                out = pd.to_datetime(s, errors="coerce", format="ISO8601", utc=True)
            return out.dt.tz_localize(None) if out.dt.tz is not None else out

        parsed, raw = _parse_text(col, parse)
        return pa.array(parsed.astype("datetime64[us]"), TIMESTAMP, from_pandas=True), raw
    raise InvalidInput(f"column {name} is {typ}, not a timestamp", field=name)


def coerce_table(table: pa.Table) -> pa.Table:
    """The chunk columns of ``table`` (any of :data:`CHUNK_COLUMNS` it has) in the chunk's
    types, plus ``_raw_<column>`` for the columns with unreadable cells."""
    columns, raws = {}, {}
    for name in table.column_names:
        if name not in CHUNK_COLUMNS:
            continue
        col = table.column(name)
        convert = _timestamp if name in (PICKUP, DROPOFF) else _number
        columns[name], raw = convert(name, col)
        if raw is not None:
            raws[raw_column(name)] = raw
    if DROPOFF in columns and any(is_date_only(table.column(c).type)
                                  for c in (PICKUP, DROPOFF) if c in table.column_names):
        columns[DROPOFF] = pa.nulls(table.num_rows, TIMESTAMP)  # no time of day, no duration
    return pa.table({**columns, **raws})

