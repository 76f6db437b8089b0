"""Ride validation and feature building: pure, vectorized, no I/O.

A ride is ``{"PULocationID": int 1..265, "DOLocationID": int 1..265,
"trip_distance": float >= 0}``. The model features follow the MLOps Zoomcamp
course: ``PU_DO = f"{PULocationID}_{DOLocationID}"`` and ``trip_distance``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serve.errors import InvalidInput

if TYPE_CHECKING:  # pandas is imported where a DataFrame is handled, not by the JSON paths
    import pandas as pd

RIDE_COLUMNS = ("PULocationID", "DOLocationID", "trip_distance")
LOCATION_COLUMNS = ("PULocationID", "DOLocationID")
MIN_LOCATION, MAX_LOCATION = 1, 265
MIN_MINUTES, MAX_MINUTES = 1.0, 60.0
# Pair key = PU * KEY_BASE + DO; a dense lookup table of this size maps a pair to its column.
KEY_BASE = MAX_LOCATION + 1


@dataclass(frozen=True)
class Rides:
    """Validated ride columns as numpy arrays, the form every predictor takes."""

    pu: np.ndarray  # int64
    do: np.ndarray  # int64
    distance: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.distance)


def _is_number(v) -> bool:
    """A JSON/numpy number that is not a boolean."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_))


def _to_float(v) -> float:
    """A JSON value as a float: NaN unless a real number, inf beyond float range."""
    if not _is_number(v):
        return math.nan
    try:
        return float(v)
    except OverflowError:  # a 400-digit integer is out of range, not a crash
        return math.inf


def _floats(arr: np.ndarray) -> np.ndarray:
    """Float64 view of a column: numeric dtypes as they are; object columns (JSON mixes,
    never a TLC file) element by element, so bools, strings and huge integers are rejected
    instead of coerced or overflowing; other dtypes (strings) are not numbers."""
    if arr.dtype.kind in "iufb":
        return arr.astype(np.float64) if arr.dtype.kind != "b" else np.full(len(arr), np.nan)
    if arr.dtype == object:
        return np.fromiter((_to_float(v) for v in arr), dtype=np.float64, count=len(arr))
    import pandas as pd

    return pd.to_numeric(pd.Series(arr, copy=False), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan, copy=True)


def _as_locations(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer location ids and a per-row 'bad' mask (wrong type, not integral, out of range)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        ints = arr.astype(np.int64, copy=False)
        bad = np.zeros(len(ints), dtype=bool)
    else:
        # Floats (a column with nulls) and objects (JSON mixes) are accepted when integral.
        nums = _floats(arr)
        bad = ~np.isfinite(nums) | (nums != np.round(nums))
        ints = np.where(bad, 0, nums).astype(np.int64)
    bad |= (ints < MIN_LOCATION) | (ints > MAX_LOCATION)
    return ints, bad


def _as_distance(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float distances and a per-row 'bad' mask (not a number, negative, non-finite)."""
    arr = np.asarray(values)
    dist = arr.astype(np.float64, copy=False) if arr.dtype.kind in "iuf" else _floats(arr)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(dist) | (dist < 0)
    return dist, bad


def check_rides(df: pd.DataFrame) -> tuple[Rides, np.ndarray]:
    """Parse ride columns row by row without raising.

    Returns the parsed columns (bad rows hold placeholders) and an array of
    reasons: ``""`` for a valid row, else a message naming the first bad field.
    A missing column makes every row invalid.
    """
    n = len(df)
    reasons = np.full(n, "", dtype=object)
    missing = [c for c in RIDE_COLUMNS if c not in df.columns]
    if missing:
        reasons[:] = f"missing field: {missing[0]}"
        zeros = np.zeros(n, dtype=np.int64)
        return Rides(zeros, zeros, np.zeros(n)), reasons
    pu, pu_bad = _as_locations(df["PULocationID"].to_numpy())
    do, do_bad = _as_locations(df["DOLocationID"].to_numpy())
    dist, dist_bad = _as_distance(df["trip_distance"].to_numpy())
    # Assign in reverse so that the first bad field in RIDE_COLUMNS order wins.
    reasons[dist_bad] = "trip_distance must be a finite number >= 0"
    reasons[do_bad] = f"DOLocationID must be an integer in {MIN_LOCATION}..{MAX_LOCATION}"
    reasons[pu_bad] = f"PULocationID must be an integer in {MIN_LOCATION}..{MAX_LOCATION}"
    return Rides(pu, do, np.where(dist_bad, 0.0, dist)), reasons


def validate_rides(df: pd.DataFrame) -> Rides:
    """Parse ride columns, raising :class:`InvalidInput` naming the first bad field and row."""
    for col in RIDE_COLUMNS:
        if col not in df.columns:
            raise InvalidInput(f"missing field: {col!r} (a ride needs {', '.join(RIDE_COLUMNS)})",
                               field=col)
    rides, reasons = check_rides(df)
    bad = np.flatnonzero(reasons != "")
    if len(bad):
        row = int(bad[0])
        field = str(reasons[row]).split(" ", 1)[0]
        value = df[field].iloc[row]
        # Messages show -1.0, not np.float64(-1.0).
        value = value.item() if isinstance(value, np.generic) else value
        raise InvalidInput(f"row {row}: {reasons[row]}, got {value!r}", field=field)
    return rides


def parse_ride(record) -> tuple[int, int, float]:
    """One ride from a decoded JSON object, pandas-free; raises InvalidInput naming the field.

    Same rules as :func:`check_rides`: integral location ids in range, finite distance >= 0,
    booleans and strings rejected, extra keys ignored.
    """
    if not isinstance(record, Mapping):
        raise InvalidInput(f"a ride must be a JSON object with {', '.join(RIDE_COLUMNS)}, "
                           f"got {type(record).__name__}")
    values = []
    for col in LOCATION_COLUMNS:
        if col not in record:
            raise InvalidInput(f"missing field: {col!r}", field=col)
        v = record[col]
        # Range first: it is false for NaN and never converts, so a 400-digit integer cannot
        # raise OverflowError here (it would escape as a 500, or stall a Kinesis shard).
        if not _is_number(v) or not (MIN_LOCATION <= v <= MAX_LOCATION) or v != int(v):
            raise InvalidInput(f"{col} must be an integer in {MIN_LOCATION}..{MAX_LOCATION}, "
                               f"got {v!r}", field=col)
        values.append(int(v))
    if "trip_distance" not in record:
        raise InvalidInput("missing field: 'trip_distance'", field="trip_distance")
    d = record["trip_distance"]
    try:
        dist = float(d) if _is_number(d) else math.nan
    except OverflowError:  # an integer beyond float range
        dist = math.inf
    if not math.isfinite(dist) or dist < 0:
        shown = repr(d) if len(repr(d)) <= 40 else f"{repr(d)[:20]}... ({len(repr(d))} chars)"
        raise InvalidInput(f"trip_distance must be a finite number >= 0, got {shown}",
                           field="trip_distance")
    return values[0], values[1], dist


def rides_from_rows(rows: Sequence[tuple[int, int, float]]) -> Rides:
    """Rides from ``parse_ride`` tuples: the one builder for JSON inputs (web, stream)."""
    if len(rows) == 1:  # the common one-ride request: skip zip/list building
        pu, do, d = rows[0]
        return Rides(np.array([pu], dtype=np.int64), np.array([do], dtype=np.int64),
                     np.array([d], dtype=np.float64))
    pu, do, d = zip(*rows, strict=True) if rows else ((), (), ())
    return Rides(np.array(pu, dtype=np.int64), np.array(do, dtype=np.int64),
                 np.array(d, dtype=np.float64))


def ride_durations(pickup: pd.Series, dropoff: pd.Series) -> np.ndarray:
    """Ride duration in minutes from pickup and dropoff timestamps."""
    return (dropoff - pickup).dt.total_seconds().to_numpy(dtype=np.float64) / 60.0


def duration_mask(minutes: np.ndarray) -> np.ndarray:
    """Rows kept for training and evaluation: 1 <= minutes <= 60."""
    with np.errstate(invalid="ignore"):
        return (minutes >= MIN_MINUTES) & (minutes <= MAX_MINUTES)


def pair_keys(rides: Rides) -> np.ndarray:
    """Integer key of the PU_DO pair, the vectorized stand-in for the string feature."""
    return rides.pu * KEY_BASE + rides.do


def ride_dicts(df: pd.DataFrame) -> list[dict]:
    """Course-style feature dicts (``PU_DO`` string + ``trip_distance``), used to fit the
    DictVectorizer and by the course-style baselines; never on a serving path."""
    import pandas as pd

    pu_do = df["PULocationID"].astype(str) + "_" + df["DOLocationID"].astype(str)
    return pd.DataFrame({"PU_DO": pu_do, "trip_distance": df["trip_distance"]}).to_dict(
        orient="records"
    )
