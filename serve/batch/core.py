"""The pure part of batch scoring: one chunk of rides -> predictions, rejects, running totals.

No I/O: readers (:mod:`serve.batch.sources`) hand in Arrow tables with
:data:`CHUNK_COLUMNS`; writers (:mod:`serve.batch.output`) take the tables out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from serve.features import RIDE_COLUMNS, Rides, check_rides, duration_mask

# Normalized chunk columns: every reader yields these, whatever the source calls them.
PICKUP, DROPOFF = "pickup_datetime", "dropoff_datetime"
CHUNK_COLUMNS = (PICKUP, DROPOFF, *RIDE_COLUMNS)

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
REJECTS_SCHEMA = pa.schema([
    ("ride_id", pa.string()),
    ("pickup_datetime", pa.timestamp("us")),
    ("PULocationID", pa.float64()),
    ("DOLocationID", pa.float64()),
    ("trip_distance", pa.float64()),
    ("reason", pa.string()),
])


@dataclass
class Totals:
    """Running counts and error sums of one month (evaluation on 1 <= actual <= 60 minutes)."""

    rows: int = 0
    scored: int = 0
    rejected: int = 0
    evaluated: int = 0
    sq_err: float = 0.0
    abs_err: float = 0.0
    pred_sum: float = 0.0

    def add(self, other: Totals) -> None:
        """Accumulate another chunk's totals."""
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def metrics(self) -> dict[str, float]:
        """The numbers logged to MLflow; RMSE/MAE only when some rows could be evaluated."""
        out = {"rows": self.rows, "rows_scored": self.scored, "rows_rejected": self.rejected,
               "rows_evaluated": self.evaluated,
               "mean_predicted_duration": self.pred_sum / self.scored if self.scored else 0.0}
        if self.evaluated:
            out["rmse"] = float(np.sqrt(self.sq_err / self.evaluated))
            out["mae"] = self.abs_err / self.evaluated
        return out


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


def score_chunk(chunk: pa.Table, first_row: int, model, version: str,
                id_prefix: str) -> ScoredChunk:
    """Validate, score and split one chunk (columns :data:`CHUNK_COLUMNS`).

    ``first_row`` is the chunk's offset in the input, so ride ids are positions in the input.
    ``model`` is a ``RideDurationModel`` (anything with ``predict_rides``).
    """
    n = chunk.num_rows
    frame = pd.DataFrame({c: _numpy(chunk.column(c)) for c in RIDE_COLUMNS})
    rides, reasons = check_rides(frame)
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

    if ok.all():
        rejects = REJECTS_SCHEMA.empty_table()
    else:  # only the rejected rows are converted
        bad = pa.array(~ok)
        rejects = pa.table([
            ids.filter(bad), pickup.filter(bad),
            *(pa.array(pd.to_numeric(frame[c].to_numpy()[~ok], errors="coerce")
                       .astype(np.float64), from_pandas=True) for c in RIDE_COLUMNS),
            pa.array(reasons[~ok].astype(str), pa.string()),
        ], schema=REJECTS_SCHEMA)

    m = duration_mask(act)
    err = pred[m] - act[m]
    totals = Totals(rows=n, scored=len(pred), rejected=n - len(pred), evaluated=int(m.sum()),
                    sq_err=float(err @ err), abs_err=float(np.abs(err).sum()),
                    pred_sum=float(pred.sum()))
    return ScoredChunk(predictions, rejects, totals)
