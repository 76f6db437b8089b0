"""The pure part of batch scoring: one chunk of rides -> predictions, rejects, running totals.

No I/O: readers (:mod:`serve.batch.sources`) hand in Arrow tables with the chunk columns
in the types :func:`serve.batch.coerce.coerce_table` gives; writers
(:mod:`serve.batch.output`) take the tables out. :func:`refusal` says when a month's
output must not replace what is there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from serve.batch.coerce import DROPOFF, PICKUP, raw_column
from serve.batch.months import parse_month
from serve.errors import DurationError
from serve.features import LOCATION_COLUMNS, RIDE_COLUMNS, Rides, check_rides, duration_mask

OUTPUT_SCHEMA = pa.schema([
    ("ride_id", pa.string()),
    ("pickup_datetime", pa.timestamp("us")),
    ("PULocationID", pa.int64()),
    ("DOLocationID", pa.int64()),
    ("actual_duration", pa.float64()),
    ("predicted_duration", pa.float64()),
    ("diff", pa.float64()),
    ("model_version", pa.string()),
])
# Location ids as integers (null where the value was not an integer id: the reason shows it).
REJECTS_SCHEMA = pa.schema([
    ("ride_id", pa.string()),
    ("pickup_datetime", pa.timestamp("us")),
    ("PULocationID", pa.int64()),
    ("DOLocationID", pa.int64()),
    ("trip_distance", pa.float64()),
    ("reason", pa.string()),
])
# Rides that cross midnight at a month's ends (and clock skew) may sit one day outside it.
MONTH_TOLERANCE = np.timedelta64(1, "D")
# At least this share of a month's pickups must fall in the month (± the tolerance).
MIN_IN_MONTH = 0.5


class MonthRefused(DurationError):
    """A month's new output was not published: it would have replaced the month's output
    with nothing scored, too many rejects, or another month's rides."""

    error_code = "MONTH_REFUSED"
    status_code = 422


@dataclass
class Totals:
    """Running counts and error sums of one month (evaluation on 1 <= actual <= 60 minutes),
    plus what the publish checks need: pickups seen and in the month, a first reject reason."""

    rows: int = 0
    scored: int = 0
    rejected: int = 0
    evaluated: int = 0
    sq_err: float = 0.0
    abs_err: float = 0.0
    pred_sum: float = 0.0
    dated: int = 0  # rows with a pickup time
    in_month: int = 0  # ... inside the month (± MONTH_TOLERANCE)
    first_reject: str = ""
    other_months: Counter = field(default_factory=Counter)  # pickup months of off chunks

    def add(self, other: Totals) -> None:
        """Accumulate another chunk's totals."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, str):
                setattr(self, f.name, mine or theirs)
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, f.name, mine + theirs)

    def metrics(self) -> dict[str, float]:
        """The numbers logged to MLflow; RMSE/MAE only when some rows could be evaluated."""
        out = {"rows": self.rows, "rows_scored": self.scored, "rows_rejected": self.rejected,
               "rows_evaluated": self.evaluated,
               "mean_predicted_duration": self.pred_sum / self.scored if self.scored else 0.0}
        if self.evaluated:
            out["rmse"] = float(np.sqrt(self.sq_err / self.evaluated))
            out["mae"] = self.abs_err / self.evaluated
        return out


def month_window(month: str) -> tuple[np.datetime64, np.datetime64]:
    """``[first day - 1 day, next month's first day + 1 day)`` of ``YYYY-MM``, in us."""
    year, mm = parse_month(month)
    start = np.datetime64(f"{year:04d}-{mm:02d}", "M")
    return ((start - MONTH_TOLERANCE).astype("datetime64[us]"),
            (start + 1 + MONTH_TOLERANCE).astype("datetime64[us]"))


def refusal(totals: Totals, month: str, max_reject_ratio: float) -> str | None:
    """Why a month's output must not be published (it would replace a good one), or None.

    Nothing scored, more rejects than ``max_reject_ratio`` of the rows, or pickups that are
    mostly not in ``month`` (a file of another month, or the wrong ``--month``).
    """
    if totals.rows == 0:
        return "the input has no rows for this month"
    example = f" (first: {totals.first_reject})" if totals.first_reject else ""
    if totals.scored == 0:
        return f"no ride could be scored: all {totals.rows:,} rows rejected{example}"
    if totals.rejected > max_reject_ratio * totals.rows:
        return (f"{totals.rejected:,} of {totals.rows:,} rows rejected "
                f"({totals.rejected / totals.rows:.1%}), more than --max-reject-ratio "
                f"{max_reject_ratio:g}{example}")
    if totals.dated and totals.in_month < MIN_IN_MONTH * totals.dated:
        seen = ", ".join(f"{m} ({n:,})" for m, n in totals.other_months.most_common(3))
        return (f"only {totals.in_month:,} of {totals.dated:,} pickups fall in {month} "
                f"(± 1 day); the input's pickups are in {seen or 'other months'}: "
                f"wrong file or wrong --month")
    return None


@dataclass
class ScoredChunk:
    """Predictions and rejects of one chunk, as Arrow tables in the output schemas."""

    predictions: pa.Table
    rejects: pa.Table
    totals: Totals


def _numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as numpy; integer columns with nulls become float with NaN."""
    return col.to_numpy(zero_copy_only=False)


def _micros(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp column as ``timestamp("us")`` (as is when it already is)."""
    return col if col.type == pa.timestamp("us") else pc.cast(col, pa.timestamp("us"),
                                                               safe=False)


def minutes_between(pickup: pa.ChunkedArray, dropoff: pa.ChunkedArray) -> np.ndarray:
    """Duration in minutes; NaN where a timestamp is missing."""
    return (_numpy(_micros(dropoff)) - _numpy(_micros(pickup))) / np.timedelta64(60, "s")


def _shown(value, location: bool) -> str:
    """A cell as a reject reason shows it: ``null``, an integral id as an integer, else repr."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    if location and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _explain(table: pa.Table, reasons: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``reasons`` of ``rows`` completed with the value that broke the rule (``", got 300"``):
    the raw text of a cell that could not be read, else the value the rejects file shows."""
    out = reasons.copy()
    for col in (*RIDE_COLUMNS, PICKUP, DROPOFF):
        sel = np.flatnonzero(np.char.startswith(reasons.astype(str), f"{col} "))
        if not len(sel) or col not in table.column_names:
            continue
        take = pa.array(rows[sel])
        values = table.column(col).take(take).to_pylist()
        raw_name = raw_column(col)
        raws = (table.column(raw_name).take(take).to_pylist()
                if raw_name in table.column_names else [None] * len(sel))
        location = col in LOCATION_COLUMNS
        out[sel] = [f"{r}, got {raw if raw is not None else _shown(v, location)}"
                    for r, v, raw in zip(reasons[sel], values, raws, strict=True)]
    return out


def check_table(table: pa.Table) -> tuple[Rides, np.ndarray]:
    """Validate the rides of a coerced table (:func:`serve.batch.coerce.coerce_table`):
    parsed ride columns and one reason per row, ``""`` when valid, else the first broken
    rule with the value shown (``"DOLocationID must be an integer in 1..265, got 300"``).
    A pickup or dropoff that could not be read makes the row a reject too."""
    frame = pd.DataFrame({c: _numpy(table.column(c)) for c in RIDE_COLUMNS})
    rides, reasons = check_rides(frame)
    for col in (PICKUP, DROPOFF):
        if raw_column(col) in table.column_names:
            unreadable = _numpy(table.column(raw_column(col)).is_valid())
            reasons[unreadable & (reasons == "")] = f"{col} must be a timestamp"
    bad = np.flatnonzero(reasons != "")
    if len(bad):
        reasons[bad] = _explain(table, reasons[bad], bad)
    return rides, reasons


def _reject_ids(values: np.ndarray) -> pa.Array:
    """Location ids of rejected rows as int64; null where not an integer id."""
    nums = values.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(nums) & (nums == np.round(nums)) & (np.abs(nums) < 2.0 ** 62)
    return pa.array(np.where(ok, nums, 0).astype(np.int64), pa.int64(), mask=~ok)


def _month_counts(pickup: pa.ChunkedArray, window) -> tuple[int, int, Counter]:
    """Pickups present, pickups inside ``window``, and (only for a chunk that is mostly
    outside it) the count of pickups per month, for the refusal message."""
    times = _numpy(pickup)
    dated = times[~np.isnat(times)]
    inside = int(np.count_nonzero((dated >= window[0]) & (dated < window[1])))
    months = Counter()
    if inside < MIN_IN_MONTH * len(dated):
        months.update(str(m) for m in dated.astype("datetime64[M]"))
    return len(dated), inside, months


def score_chunk(chunk: pa.Table, first_row: int, model, version: str,
                id_prefix: str, window=None) -> ScoredChunk:
    """Validate, score and split one chunk (the chunk columns, coerced).

    ``first_row`` is the chunk's offset in the input, so ride ids are positions in the input.
    ``model`` is a ``RideDurationModel`` (anything with ``predict_rides``). ``window``
    (:func:`month_window`) counts the pickups inside the month for :func:`refusal`.
    """
    n = chunk.num_rows
    rides, reasons = check_table(chunk)
    ok = reasons == ""
    ids = pc.binary_join_element_wise(
        id_prefix, pc.cast(pa.array(np.arange(first_row, first_row + n)), pa.string()), "")
    pickup = _micros(chunk.column(PICKUP))
    actual = minutes_between(pickup, chunk.column(DROPOFF))

    valid = Rides(rides.pu[ok], rides.do[ok], rides.distance[ok])
    pred = np.asarray(model.predict_rides(valid), dtype=np.float64)
    act = actual[ok]
    keep = pa.array(ok)
    predictions = pa.table([
        ids.filter(keep), pickup.filter(keep), pa.array(valid.pu), pa.array(valid.do),
        pa.array(act, from_pandas=True), pa.array(pred), pa.array(act - pred, from_pandas=True),
        pa.repeat(pa.scalar(version, pa.string()), len(pred)),
    ], schema=OUTPUT_SCHEMA)

    first_reject = ""
    if ok.all():
        rejects = REJECTS_SCHEMA.empty_table()
    else:  # only the rejected rows are converted
        bad = np.flatnonzero(~ok)
        take = pa.array(bad)
        rejects = pa.table([
            ids.take(take), pickup.take(take),
            *(_reject_ids(_numpy(chunk.column(c).take(take))) for c in LOCATION_COLUMNS),
            pa.array(_numpy(chunk.column("trip_distance").take(take)).astype(np.float64),
                     pa.float64(), from_pandas=True),
            pa.array(reasons[bad].astype(str), pa.string()),
        ], schema=REJECTS_SCHEMA)
        first_reject = str(reasons[bad[0]])

    m = duration_mask(act)
    err = pred[m] - act[m]
    dated, in_month, months = _month_counts(pickup, window) if window else (0, 0, Counter())
    totals = Totals(rows=n, scored=len(pred), rejected=n - len(pred), evaluated=int(m.sum()),
                    sq_err=float(err @ err), abs_err=float(np.abs(err).sum()),
                    pred_sum=float(pred.sum()), dated=dated, in_month=in_month,
                    first_reject=first_reject, other_months=months)
    return ScoredChunk(predictions, rejects, totals)
